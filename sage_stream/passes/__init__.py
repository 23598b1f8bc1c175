"""The two streaming passes over the shards: pass 1 sketches, pass 2 scores.

Both read shard by shard through the same context (model, gradient features, decoder), so that
a shard is the unit of progress, of resume and of parallel work.
"""
