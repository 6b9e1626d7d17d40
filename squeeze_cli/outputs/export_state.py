"""The state `squeeze export` keeps in its folder (`.squeeze-export.json`), read by export to add to it
and by `squeeze train` to read the folder as training data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from squeeze_cli.outputs.layout import (
    EXPORT_FORMATS,
    EXPORT_OTHER_SPLITS,
    EXPORT_STATE_NAME,
    EXPORT_TRAIN_SPLIT,
)
from squeeze_cli.reading import INDEX_MAX_BYTES, read_regular_file

# The split names a state may give a subject (a split names a part's file).
SPLITS = (EXPORT_TRAIN_SPLIT, *EXPORT_OTHER_SPLITS)


def read_export_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The export state in `folder`, whole: every field export uses, of its type.

    Raises:
        `OSError`: no state file, or not a regular file (a link, a FIFO), or larger than an index may be.
        `ValueError`: not JSON, or a field missing or of another type (an edited or truncated state).
    """
    # One entry a job: sized like the run's index.
    data = read_regular_file(Path(folder) / EXPORT_STATE_NAME, INDEX_MAX_BYTES, follow_symlinks=False)
    try:
        state = json.loads(data)
    except RecursionError:  # nested too deep for the parser: damaged too
        raise ValueError("nested too deeply") from None
    if not _is_whole(state):
        raise ValueError("a field export keeps is missing or of another type")
    return state


def _is_whole(state: Any) -> bool:
    """Whether a state read from disk has every field export uses, of its type (an edited or truncated one
    must be one line, not a traceback halfway through an export or a training run)."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def strings(values: Any) -> bool:
        return isinstance(values, list) and all(isinstance(value, str) for value in values)

    def mapping(values: Any, is_value: Any) -> bool:
        return isinstance(values, dict) and all(is_value(value) for value in values.values())

    return (
        isinstance(state, dict)
        and isinstance(state.get("selection"), dict)
        # Only the layouts export writes: `squeeze train` hands the name to `datasets.load_dataset`, which
        # would take another as a dataset on the hub.
        and state["selection"].get("format") in EXPORT_FORMATS
        and is_int(state.get("next_part"))
        and state["next_part"] >= 0
        and strings(state.get("parts"))
        and strings(state.get("job_ids"))
        and mapping(state.get("rows"), is_int)
        # Only the names export itself writes (never a path).
        and mapping(state.get("subject_splits"), lambda split: split in SPLITS)
    )
