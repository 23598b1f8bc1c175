"""Pass 1's content-defined groups and merge tree (passes/groups.py): one stretch or many, the
same tree; the FD guarantee holds for the sketch merged in it."""

from __future__ import annotations

import random

import pytest
import torch

from sage_stream.fd import FrequentDirections
from sage_stream.passes.groups import BRANCH, MAX_LEVEL, TOP, Fold, boundary_level
from sage_stream.passes.sketch import plan_units


class Node:
    """A state that records how it was merged, as nested lists: the tree's shape."""

    def __init__(self, rows=()):
        self.rows = list(rows)

    def add(self, row):
        self.rows.append(row)

    def merge(self, other):
        self.rows = [self.rows, other.rows]


def test_boundary_levels():
    rows = 8
    assert boundary_level(1, rows) == 0 and boundary_level(-1, rows) == 0
    assert boundary_level(rows, rows) == 1
    assert boundary_level(rows * BRANCH, rows) == 2
    assert boundary_level(rows * BRANCH**2 * 3, rows) == 3
    assert boundary_level(0, rows) == MAX_LEVEL  # every power divides 0
    assert boundary_level(-rows, rows) == boundary_level(2**64 - rows, rows)  # unsigned bits


def one_stretch(levels):
    fold = Fold(Node)
    for i, level in enumerate(levels):
        if level:
            fold.boundary(level)
        fold.group().add(i)
    fold.handover(TOP)
    merged = Fold(Node)
    for item in fold.items:
        merged.replay(item)
    return merged.result().rows


def in_stretches(levels, cuts):
    """Workers over [cut_k, cut_{k+1}) as the pass runs them: each starts at its first
    boundary at or after its cut and ends at the first boundary at or after the next cut."""
    starts = [0] + [next((i for i in range(c, len(levels)) if levels[i]), None) for c in cuts]
    ends = starts[1:] + [len(levels)]
    merged = Fold(Node)
    for k, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        if lo is None or (hi is not None and lo >= hi):
            continue
        hi = len(levels) if hi is None else hi
        fold = Fold(Node) if k == 0 else Fold(Node, fresh=levels[lo])
        for i in range(lo, hi):
            if levels[i] and i > lo:
                fold.boundary(levels[i])
            fold.group().add(i)
        for item in fold.handover(levels[hi] if hi < len(levels) else TOP):
            merged.replay(item)
    return merged.result().rows


@pytest.mark.parametrize("seed", range(40))
def test_any_split_into_stretches_gives_the_same_tree(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 400)
    levels = [0 if rng.random() > 0.15 else min(1 + int(rng.expovariate(0.7)), 5)
              for _ in range(n)]  # fmt: skip
    expected = one_stretch(levels)
    flat = []

    def leaves(t):
        for x in t:
            leaves(x) if isinstance(x, list) else flat.append(x)

    leaves(expected)
    assert flat == list(range(n))  # every row once, in order
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, n + 1), rng.randint(0, min(6, n))))
        assert in_stretches(levels, cuts) == expected


def test_units_are_consecutive_even_and_bounded():
    refs = list(range(10))
    assert plan_units(refs, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert plan_units(refs[:3], 8) == [(0, 1), (1, 2), (2, 3)]
    assert plan_units([], 2) == [(0, 0)]


@pytest.mark.parametrize("seed", [2, 5, 33])
def test_fd_bound_holds_for_the_merged_tree(seed):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    ell, dim, n = 8, 40, 700
    scale = torch.logspace(0, -2, dim)
    a = torch.randn(n, dim) * scale  # a decaying spectrum: the sketch is lossy
    levels = [0 if rng.random() > 0.05 else rng.choice([1, 1, 1, 2, 3]) for _ in range(n)]

    def run():
        fold = Fold(lambda: FrequentDirections(ell, dim))
        for i, level in enumerate(levels):
            if level:
                fold.boundary(level)
            fold.group().update(a[i : i + 1])
        fold.handover(TOP)
        merged = Fold(lambda: FrequentDirections(ell, dim))
        for item in fold.items:
            merged.replay(item)
        return merged.result()

    merged = run()
    a64 = a.double()
    sigma, basis = merged.finalize()
    b = sigma.double()[:, None] * basis.double()
    err = torch.linalg.matrix_norm(a64.T @ a64 - b.T @ b, ord=2).item()
    frob = a64.square().sum().item()
    assert merged.n_rows == n
    assert merged.frobenius_sq == pytest.approx(frob, rel=1e-5)
    assert err <= merged.delta * (1 + 1e-4) + 1e-6 * frob
    for k in range(ell):  # Δ ≤ ‖A − A_k‖²_F / (ℓ − k)
        tail = torch.linalg.svdvals(a64)[k:].square().sum().item()
        assert merged.delta <= tail / (ell - k) * (1 + 1e-4) + 1e-9
    again = run()  # the same tree gives the same bits every time
    s2, b2 = again.finalize()
    assert torch.equal(s2, sigma) and torch.equal(b2, basis)


def test_class_sums_of_the_batch_classes_are_every_class_sums():
    # SketchState.add sums only a batch's own classes on the CPU: the same bits as the product
    # over every class (the others' rows add zeros), counts included, over batches of any size
    from sage_stream.passes.sketch import SketchState

    torch.manual_seed(5)
    classes, dim = 40, 300
    ours = SketchState(FrequentDirections(8, dim), torch.zeros(classes, dim, dtype=torch.float64),
                       torch.zeros(classes, dtype=torch.int64))  # fmt: skip
    every = torch.zeros(classes, dim, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.int64)
    for n in (1, 7, 64, 5, 128):
        grads = torch.randn(n, dim) * torch.rand(n, 1) * 100
        labels = torch.randint(0, classes, (n,))
        ours.add(grads, labels, classes)
        onehot = torch.nn.functional.one_hot(labels, classes).to(grads.dtype)
        every += (onehot.T @ grads).to(torch.float64)
        counts += onehot.sum(dim=0).to(torch.int64)
    assert torch.equal(ours.class_sums, every) and torch.equal(ours.class_counts, counts)
    assert (counts == 0).any() and (counts > 1).any()  # classes absent and repeated
