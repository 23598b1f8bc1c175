"""Selection: which scored samples to keep. Read top-down, as the step uses it:

    rules       what may be asked (scorer, balance, keep or min-score), checked once: `Rules`
    quotas      how a keep budget is shared between classes (--balance)
    orderings   each scorer's ranking value per candidate (higher kept first)
    coverage    sage-coverage's ranking: the likely mislabelled set aside (classmeans: a
                signature nearer another class's mean), a uniform seeded draw among the rest;
                without signatures the agreement and τ filter and a weighted draw
    classmeans  class means and pooled covariance of the signatures, exact over any parts
    dedup       near-copies within a class (--dedup on)
    decisions   why each row was kept or not (OUT/decisions.parquet)
    parts       one scores part prepared (candidates, checked, ranked); the count pass
    batches     the parts read once, joined into batches that every pass takes at once
    memo        a batch's derived table kept across passes, within a byte budget
    bounded     the stage's path: exact per-class cuts by passes over the parts, then the kept
                rows part by part, in memory of one part
    kept        the write pass of one unit: its kept rows and decisions, cut into parts
    reference   the same selection on a whole table in memory (the tests' reference)
    warn        warnings that the kept set may say little (no checkpoint, flat scores)

The step that reads OUT/scores/ and writes OUT/selection.parquet is passes/select.py. The
public function `sage_stream.select` (api.py) runs that step; this package is reached by its
modules' names (`from sage_stream.select.reference import select`).
"""
