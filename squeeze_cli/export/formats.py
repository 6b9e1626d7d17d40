"""The three export formats, each written as parts that `datasets` loads as they are:

- `imagefolder`: `<split>/part-NNNNN/` holding the images (`<jj>/<job id>.png`, hard links where the file
  system allows) and `metadata.parquet` (one row per image, `file_name` naming it);
- `parquet`: `data/<split>-NNNNN.parquet`, the images' bytes in an `Image` column;
- `webdataset`: `<split>-NNNNN.tar`, per image `<job id>.png`, `.txt` (the prompt) and `.json` (the row).

A part is written under a staging folder and renamed into place whole (`folder.py`), so a loader never
sees half a part. Each writer streams: one image at a time (a parquet row group at a time).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from squeeze_cli import outputs

FORMATS = outputs.EXPORT_FORMATS
PARQUET_ROW_GROUP = 256  # rows per row group: a few MB of images, read by `datasets` a group at a time


class PartWriter(Protocol):
    def add(self, png: Path, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def part_name(export_format: str, split: str, number: int) -> str:
    """Where part `number` of `split` sits in the export folder, relative to it, with `/`."""
    if export_format == "imagefolder":
        return f"{split}/part-{number:05d}"
    if export_format == "parquet":
        return f"data/{split}-{number:05d}.parquet"
    return f"{split}-{number:05d}.tar"


def open_part(
    export_format: str, path: Path, metric_names: Sequence[str], with_references: bool
) -> PartWriter:
    """A writer of one part at `path` (a staging path: nothing else reads it until it is renamed)."""
    if export_format == "imagefolder":
        return ImageFolderPart(path, metric_names, with_references)
    if export_format == "parquet":
        return ParquetPart(path, metric_names, with_references)
    return WebDatasetPart(path)


def features(metric_names: Sequence[str], *, image: Any, references: Any) -> Any:
    """The `datasets.Features` of a row: one schema for every part, whatever values a part holds."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            **image,
            "prompt": text,
            "subject": text,
            "class": text,
            "prompt_index": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "job_id": text,
            "recipe": text,
            "model_identity": text,
            "model": text,
            "license": text,
            **references,
            "variants": text,
            **{name: datasets.Value("float64") for name in metric_names},
        }
    )


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link of `source` at `target` (no bytes copied), or a copy where the file system cannot link
    (another device, no hard links)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(source, target)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class _ParquetRows:
    """Rows into one parquet file, a row group at a time."""

    def __init__(self, path: Path, schema_features: Any):
        import pyarrow.parquet as pq

        self.path = path
        self.schema = schema_features.arrow_schema
        self.writer = pq.ParquetWriter(path, self.schema)
        self.pending: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.Table.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        _fsync(self.path)


def _hex_name(key: str, suffix: str) -> str:
    """`<jj>/<key><suffix>` of a hex `key`: names that hold none of the words `datasets` reads as a split
    (`test`, `dev`, `eval`, `val`, ... anywhere in a path: a subject or photo so named split the rows, or
    broke the load), 256 folders to a part (the Hub takes at most 10,000 files a folder)."""
    return f"{key[:2]}/{key}{suffix}"


class ImageFolderPart:
    """`<part>/<jj>/<job id>.png` (linked) and `<part>/metadata.parquet`; with references, also
    `<part>/references/<jj>/<hash of the photo's path>.<ext>`, listed in the row's `references_file_names`."""

    def __init__(self, folder: Path, metric_names: Sequence[str], with_references: bool):
        import datasets

        folder.mkdir(parents=True)
        self.folder = folder
        self.with_references = with_references
        text = datasets.Value("string")
        references = {"references_file_names" if with_references else "references": datasets.List(text)}
        self.rows = _ParquetRows(
            folder / "metadata.parquet",
            features(metric_names, image={"file_name": text}, references=references),
        )
        self.linked: set[str] = set()

    def add(self, png: Path, row: dict[str, Any]) -> None:
        name = _hex_name(row["job_id"], ".png")
        link_or_copy(png, self.folder / name)
        row = {"file_name": name, **row}
        if self.with_references:
            names = []
            for reference in row.pop("references"):
                key = hashlib.sha256(reference.encode()).hexdigest()[:16]
                name = "references/" + _hex_name(key, Path(reference).suffix.lower())
                if name not in self.linked:  # each photo once per part
                    link_or_copy(Path(reference), self.folder / name)
                    self.linked.add(name)
                names.append(name)
            row["references_file_names"] = names
        self.rows.add(row)

    def close(self) -> None:
        self.rows.close()
        for folder in {path.parent for path in self.folder.rglob("*")}:  # the links' names
            outputs.fsync_dir(folder)


class ParquetPart:
    """One parquet file: the image's bytes in `image`; with references, their bytes in `references`."""

    def __init__(self, path: Path, metric_names: Sequence[str], with_references: bool):
        import datasets

        path.parent.mkdir(parents=True, exist_ok=True)
        self.with_references = with_references
        reference = datasets.Image() if with_references else datasets.Value("string")
        self.rows = _ParquetRows(
            path,
            features(
                metric_names,
                image={"image": datasets.Image()},
                references={"references": datasets.List(reference)},
            ),
        )

    def add(self, png: Path, row: dict[str, Any]) -> None:
        image = {"bytes": png.read_bytes(), "path": f"{png.parent.name}/{png.name}"}
        if self.with_references:
            row = {
                **row,
                "references": [
                    {"bytes": Path(r).read_bytes(), "path": Path(r).name} for r in row["references"]
                ],
            }
        self.rows.add({"image": image, **row})

    def close(self) -> None:
        self.rows.close()


class WebDatasetPart:
    """One tar in the WebDataset layout: per image `<job id>.png`, `<job id>.txt`, `<job id>.json`."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # names are short: no PAX headers

    def add(self, png: Path, row: dict[str, Any]) -> None:
        key = row["job_id"]  # no `.`: the loader splits a member's name at its first dot
        with open(png, "rb") as image:
            info = self.tar.gettarinfo(fileobj=image, arcname=f"{key}.png")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, image)
        self._add_bytes(f"{key}.txt", row["prompt"].encode())
        self._add_bytes(f"{key}.json", json.dumps(row, ensure_ascii=False).encode())

    def _add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        _fsync(self.path)
