"""Pass 1's groups and merge tree, both fixed by the samples' content, not by shards or workers.

    rows in global order → groups (each sketched from empty) → merged in a tree → one sketch

A group starts at every sample whose content digest (`batches.content_digest`) is a multiple
of `group_rows(ℓ)` (on average one group per that many samples); such a start is a *boundary*
of level 1, or of level L when the digest is also a multiple of group_rows·BRANCH^(L−1). The
tree has one node per span between boundaries of a level: a level-j node is the fold, in order,
of the level-(j−1) nodes between two boundaries of level > j, and a level-0 node is a group.
This is content-defined chunking, as rsync and backup tools cut files: where the groups and the
tree's nodes fall depends only on the samples in their global order, so

- the same samples in the same order give the same sketch however they are split into shards
  (1 or 2,000: as many merges either way, about N / group_rows), and in whichever format;
- any executor gives the same bytes: a worker that covers a stretch of the stream folds what
  lies wholly inside it and hands the rest over as `Item`s, which `replay` folds in order, on
  top of what came before, exactly as one process reading the whole stream folds it.

`Fold` is the tree's open nodes while streaming: `acc[j]` is the level-j node being built,
`acc[0]` the group receiving rows, `acc[TOP]` the result once the stream has ended. It works
on any state with `merge(other)` (pass 1's `SketchState`); memory is one state per open level,
O(log(N / group_rows)) states. Pure bookkeeping: no storage, no tensors of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

GROUP_ELLS = 8  # rows per group on average, in units of ℓ. A merge streams the group's rows
# into its parent (fd.merge), about one shrink: 40,000 rows at ℓ = 256, D = 2,570 took 8.1-8.6
# CPU s in groups of 2ℓ to 16ℓ, 7.7-8.0 s as one plain stream (docs/benchmarks.md)
BRANCH = 8  # children per tree node on average
MAX_LEVEL = 12  # boundary levels above this count as this one
TOP = MAX_LEVEL + 1  # the end of the stream: a boundary above every other


def group_rows(ell: int) -> int:
    """The average number of samples per group, for sketch size ℓ."""
    return GROUP_ELLS * ell


def boundary_level(digest: int, rows: int) -> int:
    """0 if a sample with this digest continues the current group, else the level (≥ 1) of
    the boundary it starts: 1 + how many times BRANCH divides digest / rows."""
    u = digest % 2**64  # the digest's bits as unsigned
    if u % rows:
        return 0
    u //= rows
    level = 1
    while level < MAX_LEVEL and u % BRANCH == 0:
        u //= BRANCH
        level += 1
    return level


class Mergeable(Protocol):
    def merge(self, other: Any) -> None: ...


S = TypeVar("S", bound=Mergeable)


@dataclass
class Item(Generic[S]):
    """What a worker hands over, in stream order (see `Fold.boundary` and `Fold.handover`).

    kind "close": `state` is a complete level-`level` node (None: empty) whose parent began
    before the worker's stretch; put it at acc[level], then apply a boundary of level
    `boundary`. kind "set": `state` is the open level-`level` node at the end of the stretch.
    `state` may be replaced by a reference (a URL) while the item travels.
    """

    kind: str
    level: int
    state: Any
    boundary: int = 0


class Fold(Generic[S]):
    """The open nodes of the merge tree over one stretch of the stream.

    `fresh`: the levels below it started inside this stretch (all of them, TOP + 1, for a
    stretch that starts the stream; the start boundary's level for one that starts at a
    boundary). A close into a level at or above `fresh` cannot be done here, because that
    node holds samples from before the stretch: it becomes an `Item` instead.
    """

    def __init__(self, empty: Callable[[], S], fresh: int = TOP + 1):
        self.empty = empty
        self.acc: list[S | None] = [None] * (TOP + 1)
        self.fresh = fresh
        self.items: list[Item[S]] = []

    def group(self) -> S:
        """The group receiving rows (acc[0]), started on first use."""
        group = self.acc[0]
        if group is None:
            group = self.acc[0] = self.empty()
        return group

    def boundary(self, level: int) -> None:
        """A sample starting a boundary of `level` arrives: close levels 0 .. level − 1."""
        for j in range(level):
            child, self.acc[j] = self.acc[j], None
            if j + 1 >= self.fresh:  # the parent began before this stretch: hand over
                self.items.append(Item("close", j, child, level))
                break
            self._fold_into(j + 1, child)
        self.fresh = max(self.fresh, level)

    def handover(self, stop_level: int) -> list[Item[S]]:
        """End the stretch at a boundary of `stop_level` (TOP: the end of the stream): apply
        it, then hand over the open nodes it leaves. Returns every item of the stretch."""
        self.boundary(stop_level)
        for level in range(stop_level, min(self.fresh, TOP + 1)):
            if self.acc[level] is not None:
                self.items.append(Item("set", level, self.acc[level]))
                self.acc[level] = None
        return self.items

    def replay(self, item: Item[S]) -> None:
        """Apply a worker's item (its state loaded) as if its stretch had been read here."""
        self.acc[item.level] = item.state
        if item.kind == "close":
            self.boundary(item.boundary)

    def result(self) -> S | None:
        """The fold of everything, once the stream's end (a boundary of level TOP) is applied."""
        return self.acc[TOP]

    def _fold_into(self, level: int, child: S | None) -> None:
        if child is None:
            return
        parent = self.acc[level]
        if parent is None:
            self.acc[level] = child  # a first child becomes its parent: no merge
        else:
            parent.merge(child)

    # --- checkpoints -------------------------------------------------------------------------
    def state(self, save: Callable[[S], Any]) -> dict[str, Any]:
        """The open nodes and `fresh` (items are the caller's: they may be stored elsewhere)."""
        acc = [None if s is None else save(s) for s in self.acc]
        return {"acc": acc, "fresh": self.fresh}

    @classmethod
    def restore(
        cls, saved: dict[str, Any], empty: Callable[[], S], load: Callable[[Any], S]
    ) -> Fold[S]:
        fold = cls(empty, int(saved["fresh"]))
        fold.acc = [None if s is None else load(s) for s in saved["acc"]]
        return fold
