"""Where are near-copies found best: the head's input h, the sketch coordinates z, or the gradient g?

For each data set of the quality benchmark (`quality_data.py`), the proxy of the near-copies
pool and of the clean pool gives, per sample, h (the head's input, which the last-layer
gradient is made of), g (the last-layer gradient, as the stage computes it) and z = B g (B the
rank-ℓ truncated SVD of all g, what an FD sketch with ℓ ≥ rank holds). Near-copies are grouped
greedily within each class (a sample joins the first earlier representative with cosine
≥ 1 − ε, else it becomes one), and the groups are compared with the known copies:

    precision   of the pairs put in one group, the share that are copies of one original
    recall      of the pairs of copies of one original, the share put in one group
    false merge on the clean pool (no copies), the share of samples set aside as a copy

Then the rule the stage uses (select/dedup.py): the 32-number signature of h that pass 2
records, squared distance within ε · (mean squared distance of a pair of the class), grouped
by `dedup.group`, for several ε (space "sig").

    cd benchmarks && python dedup_study.py      # prints a table, writes results/dedup-study.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from quality_data import DATASETS, prepare

from sage_stream.gradients.featurizer import GradientFeaturizer
from sage_stream.select import dedup
from sage_stream.signature import copy_signature

EPSILONS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
RELATIVE = (1e-3, 3e-3, 5e-3, 1e-2, 3e-2)
ELL = 256


def vectors(sc) -> dict[str, np.ndarray]:  # noqa: ANN001
    """h, g and z of every pool sample under the scenario's proxy."""
    proxy = _load(sc)
    seen: list[torch.Tensor] = []
    feat = GradientFeaturizer(proxy)
    handle = feat.head.register_forward_hook(lambda _m, i, _o: seen.append(i[0].detach()))
    with torch.no_grad():
        got = feat(torch.from_numpy(sc.x), torch.from_numpy(sc.y))
    handle.remove()
    g = got.grads.double().numpy()
    _, s, vt = np.linalg.svd(g, full_matrices=False)
    z = (g @ vt[:ELL].T) * s[:ELL]
    sig = copy_signature(seen[0]).double().numpy()
    return {"h": seen[0].double().numpy(), "z": z, "g": g, "sig": sig}


def relative_groups(sig: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """(N,) representative of each sample under the stage's rule (dedup.py), in index order."""
    rep = np.arange(len(sig))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        s = sig[members]
        stats = dedup.ClassStats({0: len(s)}, {0: s.sum(axis=0)}, {0: float((s * s).sum())})
        rep[members] = members[dedup.group(s, stats.threshold(0, eps))]
    return rep


def _load(sc) -> torch.nn.Module:  # noqa: ANN001
    import importlib

    module, fn = sc.data.model.split(":")
    model = getattr(importlib.import_module(module), fn)()
    model.load_state_dict(torch.load(sc.checkpoint, weights_only=True))
    return model.eval()


def greedy_groups(v: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """(N,) representative index of each sample: greedy, in index order, within its class."""
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    rep = np.arange(len(v))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        reps: list[int] = []
        for i in members:
            if reps:
                cos = unit[reps] @ unit[i]
                j = int(np.argmax(cos))
                if cos[j] >= 1 - eps:
                    rep[i] = reps[j]
                    continue
            reps.append(int(i))
    return rep


def pair_scores(rep: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pair precision and recall of the predicted groups against the true ones."""

    def pairs(ids: np.ndarray) -> set[tuple[int, int]]:
        out = set()
        for g in np.unique(ids):
            m = np.flatnonzero(ids == g)
            out |= {(int(a), int(b)) for k, a in enumerate(m) for b in m[k + 1 :]}
        return out

    got, want = pairs(rep), pairs(truth)
    precision = len(got & want) / len(got) if got else 1.0
    return precision, len(got & want) / len(want) if want else 1.0


def main(argv: list[str]) -> dict:
    torch.set_num_threads(1)
    found: dict = {}
    with tempfile.TemporaryDirectory(prefix="sage-dedup-") as work:
        for data in DATASETS:
            sc_copies = prepare(data, "near-copies", Path(work))
            copies = vectors(sc_copies)
            sc_clean = prepare(data, "clean", Path(work))
            clean = vectors(sc_clean)
            for space in ("h", "z", "g"):
                for eps in EPSILONS:
                    rep = greedy_groups(copies[space], sc_copies.y, eps)
                    p, r = pair_scores(rep, sc_copies.group)
                    fm = float(np.mean(greedy_groups(clean[space], sc_clean.y, eps)
                                       != np.arange(len(sc_clean.y))))  # fmt: skip
                    found[f"{data} {space} {eps}"] = {"precision": p, "recall": r,
                                                      "false_merge": fm}  # fmt: skip
                    print(f"{data:8} {space} eps {eps:<7g} precision {p:.3f} recall {r:.3f} "
                          f"false merges {fm:.2%}", flush=True)  # fmt: skip
            for eps in RELATIVE:
                rep = relative_groups(copies["sig"], sc_copies.y, eps)
                p, r = pair_scores(rep, sc_copies.group)
                fm = float(np.mean(relative_groups(clean["sig"], sc_clean.y, eps)
                                   != np.arange(len(sc_clean.y))))  # fmt: skip
                found[f"{data} sig {eps}"] = {"precision": p, "recall": r, "false_merge": fm}
                print(f"{data:8} sig relative eps {eps:<7g} precision {p:.3f} recall {r:.3f} "
                      f"false merges {fm:.2%}", flush=True)  # fmt: skip
    out = Path(__file__).parent / "results" / "dedup-study.json"
    out.write_text(json.dumps({"command": "python dedup_study.py", "cells": found}, indent=1))
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
