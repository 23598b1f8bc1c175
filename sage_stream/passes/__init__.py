"""The shard loops: pass 1 sketches, pass 2 scores, emit copies the kept samples out.

    loop     the one shard loop both passes consume (read → decode → batch → model → gradient
             features), applying --on-error once
    sketch   pass 1: FD sketch + class sums → sketch.zarr, in fixed groups of shards merged in
             a fixed tree
    score    pass 2: a row per sample → scores/ (centroid: scored afterwards from stored z)
    select   the kept samples → selection.parquet (what is kept: the `select` package)
    emit     kept samples byte for byte → shards/, then the manifest and _SUCCESS

A shard is the unit of progress, of resume and of parallel work. Each pass keeps its own
bookkeeping (what is done, the tallies) and asks an executor (`executors/`) only to run the
per-shard work of a list of shards.
"""
