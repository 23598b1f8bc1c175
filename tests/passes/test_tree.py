"""Pass 1's fixed groups and merge tree: the plan depends on the shard list only, and the FD
guarantee holds for the sketch merged in the tree."""

from __future__ import annotations

import pytest
import torch

from sage_stream.fd import FrequentDirections
from sage_stream.passes.sketch import MAX_GROUPS, merge_in_tree, plan_groups, tree_split


def test_groups_are_consecutive_even_and_bounded():
    refs = list(range(10))
    assert plan_groups(refs, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert plan_groups(refs[:3]) == [[0], [1], [2]]  # one shard per group below the bound
    many = plan_groups(list(range(5000)))
    assert len(many) == MAX_GROUPS and [r for g in many for r in g] == list(range(5000))
    assert {len(g) for g in many} == {4, 5}
    assert plan_groups([]) == [[]]


def test_tree_visits_every_leaf_once_in_order():
    seen: list[int] = []

    class Leaf:
        def __init__(self, i):
            self.items = [i]

        def merge(self, other):
            self.items += other.items

    def leaf(i):
        seen.append(i)
        return Leaf(i)

    for n in (1, 2, 3, 7, 16, 1000):
        seen.clear()
        assert merge_in_tree(0, n, leaf).items == list(range(n))  # type: ignore[arg-type]
        assert seen == list(range(n))
    assert tree_split(0, 7) == 3 and tree_split(3, 7) == 5


@pytest.mark.parametrize("groups", [2, 5, 33])
def test_fd_bound_holds_for_the_merged_tree(groups):
    torch.manual_seed(groups)
    ell, dim = 8, 40
    # Uneven groups of rows with a decaying spectrum, so the sketch is lossy.
    sizes = torch.randint(1, 60, (groups,)).tolist()
    scale = torch.logspace(0, -2, dim)
    parts = [torch.randn(n, dim) * scale for n in sizes]

    def leaf(i):
        fd = FrequentDirections(ell, dim)
        fd.update(parts[i])
        return fd

    merged = merge_in_tree(0, groups, leaf)
    a = torch.cat(parts).double()
    sigma, basis = merged.finalize()
    b = sigma.double()[:, None] * basis.double()
    err = torch.linalg.matrix_norm(a.T @ a - b.T @ b, ord=2).item()
    frob = a.square().sum().item()
    assert merged.n_rows == a.shape[0]
    assert merged.frobenius_sq == pytest.approx(frob, rel=1e-5)
    assert err <= merged.delta * (1 + 1e-4) + 1e-6 * frob
    for k in range(ell):  # Δ ≤ ‖A − A_k‖²_F / (ℓ − k)
        tail = torch.linalg.svdvals(a)[k:].square().sum().item()
        assert merged.delta <= tail / (ell - k) * (1 + 1e-4) + 1e-9
    # The same tree gives the same bits every time.
    again = merge_in_tree(0, groups, leaf)
    s2, b2 = again.finalize()
    assert torch.equal(s2, sigma) and torch.equal(b2, basis)
