"""Training data from a `squeeze export` folder (any of its formats): each row is a subject pair, its
references → its image, with the prompt as the instruction and the job id as the sample id.

The folder is recognised by the state file the export keeps (`.squeeze-export.json`), whichever `format`
(`hf` or `jsonl`) the training config names, and read with the `datasets` loader of its format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import ManifestError, Problem
from squeeze_cli.train.config import HfData, LoadedConfig
from squeeze_cli.train.data import Sample, TrainData, _as_image, load_data


def load_training_data(loaded: LoadedConfig) -> TrainData:
    """The config's training data (`data.load_data`), or the rows of a `squeeze export` folder when
    `data.path` is one, whichever `format` the config names (`hf`: its `split`; `jsonl`: `train`)."""
    if not is_export(loaded.data_path):
        return load_data(loaded)
    spec = loaded.config.data
    where = loaded.locate("data")
    file = where.file + (f":{where.line}" if where.line else "")
    return load_export_data(loaded.data_path, spec.split if isinstance(spec, HfData) else "train", file)


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `squeeze export` wrote."""
    return (Path(path) / outputs.EXPORT_STATE_NAME).is_file()


def _pair(export_format: str, row: dict[str, Any]) -> tuple[str, list[Any], str, Any]:
    """(id, references, instruction, target) of a row as the format's loader gives it."""
    if export_format == "webdataset":  # the row's fields are in its `.json` member; the caption in `.txt`
        return row["__key__"], row["json"]["references"], row["txt"], row["png"]
    return row["job_id"], row["references"], row["prompt"], row["image"]


def _unreadable_references(dataset: Any, export_format: str) -> list[tuple[str, str, str]]:
    """(path, reason, hint) of each distinct reference photo that a row names by path and gen's checks
    refuse. An export without --with-references names the photos where gen read them: one moved or deleted
    since stopped the training at its row with a traceback. (Images inside the export are export's own.)"""
    import datasets

    from squeeze_cli.images import check_image, image_hint

    if export_format == "webdataset":
        rows = [row.get("references") or [] for row in dataset["json"]]
    elif getattr(dataset.features.get("references"), "feature", None) == datasets.Value("string"):
        rows = dataset["references"]
    else:
        return []  # --with-references: images in the export
    found = []
    for path in sorted({path for row in rows for path in row if isinstance(path, str)}):
        reason = check_image(path)
        if reason is not None:
            hint = image_hint(reason) or "put the photo back, or export with --with-references to carry them"
            found.append((path, reason, hint))
    return found


def load_export_data(folder: str | os.PathLike, split: str, where: str) -> TrainData:
    """The rows of `split` of the export in `folder` as samples; `where` locates errors (the config's
    `data` section).

    Raises:
        `ManifestError`: the export or its split cannot be read, or has no rows.
    """
    import datasets

    def problem(field: str, message: str, hint: str | None = None) -> ManifestError:
        return ManifestError([Problem(where, None, None, field, message, hint)])

    folder = Path(folder)
    if split == "val":
        split = "validation"  # export's `--split val`, which `datasets` loads as `validation`
    try:
        export_format = outputs.read_export_state(folder)["selection"]["format"]
        datasets.utils.logging.disable_progress_bar()
        dataset = datasets.load_dataset(export_format, data_dir=str(folder), split=split)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise problem("data.path", f"cannot read the squeeze export {folder}: {reason}") from None
    if len(dataset) == 0:
        raise problem("data.split", f"the export's split {split!r} has no rows")

    def load(index: int) -> Sample:
        sample_id, references, instruction, target = _pair(export_format, dataset[index])
        return Sample(sample_id, [_as_image(r) for r in references], instruction, _as_image(target))

    ids = [str(value) for value in dataset["__key__" if export_format == "webdataset" else "job_id"]]
    unreadable = _unreadable_references(dataset, export_format)
    if unreadable:
        raise ManifestError(
            [
                Problem(where, None, None, "data.path", f"the export's reference {path}: {reason}", hint)
                for path, reason, hint in unreadable[:20]
            ]
        )
    try:
        load(0)  # a reference path that is gone fails here, before any model loads
    except (OSError, ValueError) as error:
        raise problem(
            "data.path",
            f"row 0 of the export does not decode: {error}",
            "export with --with-references to carry the reference images along",
        ) from None
    return TrainData(ids, load, lambda index: load(index).target.size, f"{len(ids)} samples from {folder}")
