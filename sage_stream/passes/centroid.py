"""`--consensus centroid`, the authors' reference form: μ_c = mean of the unit z_i of class c.

It needs every z_i before any score, so pass 2 stores z (float16) per shard in the sketch store,
and this step reads them back twice, shard by shard: once to sum the unit vectors per class,
once to score. Both readings use the stored float16 values, so re-scoring from the store alone
gives exactly these scores. Memory: O(C·ℓ + one shard's z).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..outputs.folder import OutputFolder
from ..outputs.tables import read_part, write_part
from ..sample import ShardRef
from ..scores import ORTHOGONAL, agreement


@dataclass
class _Part:
    table: pa.Table
    shard_error: str | None
    labels: torch.Tensor  # (n,) int64, 0 where null (such rows are never usable)
    unit: torch.Tensor  # (n, ℓ) float64, unit z rows
    usable: torch.Tensor  # (n,) bool: status ok and z not zero after float16 storage


def _read(folder: OutputFolder, shard: str) -> _Part:
    table, shard_error = read_part(folder, shard)
    z = folder.sketch_store().read_projections(shard)
    z = z.to(torch.float64)  # (n, ℓ)
    norms = z.norm(dim=1, keepdim=True)
    ok = torch.tensor(pc.equal(table["status"], "ok").to_pylist(), dtype=torch.bool)
    usable = ok & (norms.squeeze(1) > 0)  # float16 may underflow a tiny z to zero
    unit = torch.where(norms > 0, z / norms.clamp_min(1e-300), torch.zeros_like(z))
    labels = torch.tensor(table["label"].fill_null(0).to_pylist(), dtype=torch.int64)
    return _Part(table, shard_error, labels, unit, usable)


def centroid_consensus(
    folder: OutputFolder, refs: list[ShardRef], num_classes: int, ell: int
) -> torch.Tensor:
    """μ_c = mean of unit z_i over usable samples of class c; (C, ℓ) float64, zero if none."""
    sums = torch.zeros(num_classes, ell, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for ref in refs:
        part = _read(folder, ref.name)
        labels = part.labels[part.usable]
        sums.index_add_(0, labels, part.unit[part.usable])
        counts += torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return sums / counts.clamp_min(1).unsqueeze(1)


def _with_scores(part: _Part, consensus: torch.Tensor) -> pa.Table:
    """The part's table with score filled in, and newly unusable rows turned to errors."""
    table = part.table
    score = agreement(part.unit, part.labels, consensus).tolist() if table.num_rows else []
    usable = part.usable.tolist()
    lost = [s == "ok" and not u for s, u in zip(table["status"].to_pylist(), usable, strict=True)]
    columns = {
        "score": pa.array(
            [v if u else None for v, u in zip(score, usable, strict=True)], pa.float64()
        ),
        "status": pa.array(
            ["error" if x else s for x, s in zip(lost, table["status"].to_pylist(), strict=True)]
        ),
        "reason": pa.array(
            [
                ORTHOGONAL if x else r
                for x, r in zip(lost, table["reason"].to_pylist(), strict=True)
            ],
            pa.string(),
        ),
    }
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def rescore_with_centroids(
    folder: OutputFolder, refs: list[ShardRef], num_classes: int, ell: int
) -> int:
    """Fill in every part's scores from the stored z; returns the number of rows scored."""
    consensus = centroid_consensus(folder, refs, num_classes, ell)
    scored = 0
    for ref in refs:
        part = _read(folder, ref.name)
        table = _with_scores(part, consensus)
        write_part(folder, ref.name, table, part.shard_error)
        scored += int(part.usable.sum())
    return scored
