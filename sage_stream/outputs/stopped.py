"""Why a step stopped: OUT/_work/stopped.json, written when a step fails or is interrupted.

Where it sits: around each step that writes OUT (api.py), inside its lease. A run that stops
early (nearly every sample failed, a shard error under --on-error fail, SIGTERM) leaves little
else behind; this record lets `sage-stream inspect OUT` say which step stopped and why, after
the process and its log are gone. It is written only for a run in progress (OUT claimed, its
`_work/run.json` there), never into a finished output; the next step removes it, and `_work/`
(with it) goes when the run finishes. Nothing reads it but `inspect`: no result depends on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import SageError, stopped_by_sigterm
from .folder import OutputFolder

log = logging.getLogger("sage_stream")


@dataclass
class Stage:
    """The step a command is in; `run` moves it along (sketch, score, select, emit)."""

    step: str


@contextlib.contextmanager
def recorded_stop(folder: OutputFolder, step: str) -> Iterator[Stage]:
    """Run the block; if it raises a SageError or is interrupted, record where and why."""
    stage = Stage(step)
    _clear(folder)
    try:
        yield stage
    except SageError as exc:
        _record(folder, {"step": stage.step, "error": type(exc).__name__, "message": str(exc)})
        raise
    except KeyboardInterrupt as exc:  # SIGINT, and SIGTERM (errors.Terminated)
        name = "SIGTERM" if stopped_by_sigterm(exc) else "SIGINT"
        _record(folder, {"step": stage.step, "error": name, "message": f"stopped by {name}"})
        raise


def read_stop(folder: OutputFolder) -> dict[str, Any] | None:
    """The record of the last step's stop, or None."""
    try:
        found = folder.read_json(folder.stopped)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _in_progress(folder: OutputFolder) -> bool:
    return folder.exists(folder.work("run.json"))


def _clear(folder: OutputFolder) -> None:
    if _in_progress(folder):
        folder.remove(folder.stopped)


def _record(folder: OutputFolder, record: dict[str, Any]) -> None:
    try:
        if _in_progress(folder):
            folder.write_json(folder.stopped, record)
    except Exception:  # noqa: BLE001 - the step's own error is the one to report
        log.debug("could not record why the step stopped in %s", folder.url, exc_info=True)
