"""Gradients: a batch → each sample's gradient feature g_i, the input of both passes.

model        the proxy model: factory, weights_only checkpoint, logits, fingerprint
featurizer   what both gradient modes share, and `GradientFeaturizer`, which builds one
last_layer   --grad last-layer: the closed form of a linear head's per-sample gradient
params       --grad params: any chosen parameters, with torch.func (or a loop)
projection   the seeded random projection of --project-dim, identical on every device
"""
