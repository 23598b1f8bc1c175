"""The one record type that flows between stages: a training example as read from its shard.

Formats are converted at the edges: a tar sample carries its members as raw bytes keyed by
field (``"png"``, ``"cls"``, ``"seg.png"``); a Parquet sample carries its row as Python values
keyed by column. Nothing downstream of the reader knows which format a sample came from except
through these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["tar", "parquet"]


@dataclass(frozen=True, slots=True)
class ShardRef:
    """One input shard: where it is and the name its outputs carry (``scores/part-<name>``)."""

    url: str
    name: str
    format: Format
    # What the shard's contents were when the inputs were listed (storage.pin_of): every
    # later open checks it, so scores are never attached to a rewritten shard. None: unpinned.
    pin: str | None = None


@dataclass(slots=True)
class Sample:
    key: str  # unique within its shard (webdataset __key__, or the Parquet key column / row)
    shard: str  # ShardRef.name of the shard it came from
    fields: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # position in its shard, counting from 0
    error: str | None = None  # set by a reader that could not make a usable sample (kept, recorded)
