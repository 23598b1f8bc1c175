"""Executors: where the passes run, kept apart from what the passes do.

    local   the shard loops in `passes/` and `emit` (the default; no extra dependency)
    ray     `executors.ray`: the same per-shard steps on a Ray cluster, shard-parallel

Nothing here imports Ray: `api` imports `sage_stream.executors.ray` only for `--executor ray`,
so the core installs and runs without the `ray` extra.
"""
