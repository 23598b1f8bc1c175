"""Gradients: a batch → each sample's gradient feature g_i, the input of both passes.

model        the proxy model: factory, weights_only checkpoint, logits, fingerprint
featurizer   per-sample gradient features, last-layer (closed form) or params (torch.func)
projection   the seeded random projection of --project-dim, identical on every device
"""
