"""The outcome of one training run, as a small JSON file beside its model.

Training ends in one of two ways, and both are results: ``ok`` (the model trained to
``max_steps``) or ``diverged`` (the loss became NaN/inf at some step). ``status.json``
records which, so a workflow can build its graph from it: Snakemake reads it through a
checkpoint and analyses only ``ok`` models, while the comparisons name the diverged
ones. No torch here: the workflow reads statuses while it builds the DAG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tga.atomic import atomic_write_text

STATUS_FILE = "status.json"
OK = "ok"
DIVERGED = "diverged"


class StatusError(ValueError):
    """A status file that is missing, unreadable or says something else than ok/diverged."""


def write_status(path: str | os.PathLike[str], status: str, **details: Any) -> None:
    """Atomically, so a reader never sees half a status."""
    if status not in (OK, DIVERGED):
        raise StatusError(f"a training status is {OK!r} or {DIVERGED!r}, not {status!r}")
    atomic_write_text(path, json.dumps({"status": status, **details}, indent=1) + "\n")


def read_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The status record; ``step`` is where a diverged run stopped."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read the training status {path} ({exc}); rerun its training job") from exc
    if not isinstance(record, dict) or record.get("status") not in (OK, DIVERGED):
        raise StatusError(f"{path} is not a training status (expected 'status': {OK!r} or {DIVERGED!r})")
    return record

