"""Training data: samples of (reference images, instruction, target image), from a JSONL file (or a folder of
JSON files) or a Hugging Face dataset, validated before any model loads.

Every sample has a stable id that depends on its content or its row, never on the step it is drawn at, so
latent caches keyed by it cannot pair a target with another sample's references.

The batch order is a pure function of (seed, epoch): samples are grouped by resolution bucket, shuffled
within each bucket and cut into batches, and the batches are shuffled. Resuming at optimiser step N
therefore draws exactly the batches an uninterrupted run draws, with no sampler state to save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from squeeze_cli.errors import ManifestError, Problem
from squeeze_cli.images import check_image, image_hint, load_rgb, upright_size
from squeeze_cli.reading import MiB, read_regular_file
from squeeze_cli.train.config import HfData, JsonlData, LoadedConfig, user_path

JSONL_KEYS = ("references", "instruction", "target")
DATA_FILE_MAX_BYTES = 1024 * MiB  # a JSONL file: millions of samples
SAMPLE_FILE_MAX_BYTES = 16 * MiB  # one sample's JSON file in the folder form
SUBJECTS200K_QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")


@dataclass(frozen=True)
class Sample:
    """One training sample, loaded."""

    id: str
    references: list[Image.Image]
    instruction: str
    target: Image.Image


class TrainData:
    """An indexable set of samples; `load(i)` decodes sample i, `size(i)` is its target's (width, height)."""

    def __init__(
        self,
        ids: Sequence[str],
        loader: Callable[[int], Sample],
        sizer: Callable[[int], tuple[int, int]],
        description: str,
        headers: Callable[[int], tuple[list[tuple[int, int]], str, Problem]] | None = None,
    ):
        self.ids = list(ids)
        self._loader = loader
        self._sizer = sizer
        self.description = description
        # For data whose image sizes are known from headers: (reference sizes, instruction, where), so the
        # MLLM's context limit can be checked for every sample before training starts.
        self.headers = headers

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Sample:
        return self._loader(index)

    def size(self, index: int) -> tuple[int, int]:
        return self._sizer(index)


def _data_error(problems: list[Problem]) -> ManifestError:
    # Long lists of bad rows: the first 20 are enough to act on.
    if len(problems) > 20:
        more = len(problems) - 20
        problems = [
            *problems[:20],
            Problem(problems[20].file, None, None, "", f"... and {more} more problems"),
        ]
    return ManifestError(problems)


# JSONL -----------------------------------------------------------------------------------------------


def _check_record(record: Any, file: str, line: int | None, base: Path) -> tuple[list[Problem], dict | None]:
    problems: list[Problem] = []

    def problem(field: str, message: str, hint: str | None = None) -> None:
        problems.append(Problem(file, line, None, field, message, hint))

    if not isinstance(record, dict):
        problem("", f"expected a JSON object, got {type(record).__name__}", 'use {"references": [...], ...}')
        return problems, None
    for key in record:
        if key not in (*JSONL_KEYS, "id"):
            problem(key, f"unknown key `{key}`", f"allowed: {', '.join((*JSONL_KEYS, 'id'))}")
    for key in JSONL_KEYS:
        if key not in record:
            problem("", f"missing required key `{key}`")
    references = record.get("references")
    if "references" in record and (
        not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references)
    ):
        problem("references", "expected a non-empty list of image paths")
        references = None
    instruction = record.get("instruction")
    if "instruction" in record and (not isinstance(instruction, str) or not instruction.strip()):
        problem("instruction", "expected a non-empty string")
    target = record.get("target")
    if "target" in record and not isinstance(target, str):
        problem("target", "expected an image path")
        target = None
    if "id" in record and not isinstance(record["id"], str):
        problem("id", "expected a string")
    paths = [(f"references[{i}]", r) for i, r in enumerate(references or [])]
    paths += [("target", target)] if isinstance(target, str) else []
    resolved = {}
    for field, relative in paths:
        try:
            path = (base / user_path(relative)).resolve()
        except ValueError as error:
            problem(field, str(error))
            continue
        if not path.exists():
            problem(field, f"no such image: {path}", "image paths are relative to the data file")
            continue
        reason = check_image(str(path))
        if reason is not None:
            problem(field, f"{path}: {reason}", image_hint(reason))
        resolved[field] = path
    if problems:
        return problems, None
    return [], {
        "id": record.get("id"),
        "references": [resolved[f"references[{i}]"] for i in range(len(references or []))],
        "instruction": instruction,
        "target": resolved["target"],
    }


def _read_jsonl(path: Path) -> tuple[list[dict], list[Problem]]:
    file = str(path)
    records, problems = [], []
    try:
        text = read_regular_file(path, DATA_FILE_MAX_BYTES).decode("utf-8")
    except OSError as error:  # a FIFO or a device (never read), too large, unreadable
        return [], [Problem(file, None, None, "", f"cannot read the data file: {error.strerror or error}")]
    except UnicodeDecodeError as error:
        return [], [Problem(file, None, None, "", f"cannot read the data file: {error}")]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(
                Problem(
                    file, number, error.colno, "", f"not valid JSON: {error.msg}", "one JSON object a line"
                )
            )
            continue
        except RecursionError:
            problems.append(Problem(file, number, None, "", "not valid JSON: nested too deeply"))
            continue
        found, checked = _check_record(record, file, number, path.parent)
        problems += found
        if checked is not None:
            checked["source"] = f"{path.name}:{number}"
            records.append(checked)
    return records, problems


def _read_json_folder(folder: Path) -> tuple[list[dict], list[Problem]]:
    records, problems = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(read_regular_file(path, SAMPLE_FILE_MAX_BYTES).decode("utf-8"))
        except OSError as error:  # a FIFO or a device (never read), too large, unreadable
            problems.append(Problem(str(path), None, None, "", f"cannot read it: {error.strerror or error}"))
            continue
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(Problem(str(path), None, None, "", f"not a readable JSON file: {error}"))
            continue
        except RecursionError:
            problems.append(Problem(str(path), None, None, "", "not valid JSON: nested too deeply"))
            continue
        found, checked = _check_record(record, str(path), None, folder)
        problems += found
        if checked is not None:
            checked["source"] = path.name
            records.append(checked)
    return records, problems


def _content_id(record: dict) -> str:
    """A sample id from what the sample is (its files' paths, sizes and mtimes, and the instruction)."""
    digest = hashlib.sha256()
    for path in [*record["references"], record["target"]]:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    digest.update(record["instruction"].encode())
    return digest.hexdigest()[:16]


def load_jsonl_data(path: str | os.PathLike) -> TrainData:
    """Samples from a JSONL file (or a folder of ``*.json`` files); raises `ManifestError` listing every bad
    line (first 20)."""
    path = Path(path)
    records, problems = _read_json_folder(path) if path.is_dir() else _read_jsonl(path)
    if not records and not problems:
        problems.append(Problem(str(path), None, None, "", "no samples", "add at least one sample"))
    ids = [record["id"] or _content_id(record) for record in records]
    seen: dict[str, str] = {}
    for record, sample_id in zip(records, ids, strict=True):
        if sample_id in seen:
            problems.append(
                Problem(
                    str(path),
                    None,
                    None,
                    "id",
                    f"sample id {sample_id!r} of {record['source']} is also used by {seen[sample_id]}",
                    "sample ids key the latent cache: make them unique",
                )
            )
        seen[sample_id] = record["source"]
    if problems:
        raise _data_error(problems)

    def load(index: int) -> Sample:
        record = records[index]
        return Sample(
            ids[index],
            [load_rgb(p) for p in record["references"]],
            record["instruction"],
            load_rgb(record["target"]),
        )

    def headers(index: int) -> tuple[list[tuple[int, int]], str, Problem]:
        record = records[index]
        _, _, line = record["source"].rpartition(":")
        if line.isdigit():  # a JSONL line
            where = Problem(str(path), int(line), None, "instruction", "")
        else:  # a file of the folder form
            where = Problem(str(path / record["source"]), None, None, "instruction", "")
        return [upright_size(p) for p in record["references"]], record["instruction"], where

    return TrainData(
        ids, load, lambda index: upright_size(records[index]["target"]), f"{len(records)} samples", headers
    )


# Hugging Face datasets -------------------------------------------------------------------------------


def _open_hf(spec: HfData, data_path: str, where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ManifestError(
            [
                Problem(
                    where,
                    None,
                    None,
                    "data.format",
                    "`format: hf` needs the `datasets` library",
                    "pip install datasets",
                )
            ]
        ) from None
    datasets.utils.logging.disable_progress_bar()
    local = Path(data_path)
    try:
        if local.is_file() or (local.is_dir() and any(local.glob("*.parquet"))):
            files = [str(local)] if local.is_file() else sorted(str(p) for p in local.glob("*.parquet"))
            return datasets.load_dataset("parquet", data_files={spec.split: files}, split=spec.split)
        if local.is_dir() and (local / "dataset_info.json").exists():
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(data_path, split=spec.split, revision=spec.revision)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            f"it is not in the local cache and HF_HUB_OFFLINE is set: first run `hf download --repo-type "
            f"dataset {data_path}`"
            if offline
            else "give a local parquet file or folder, a saved dataset folder, or a hub dataset id"
        )
        raise ManifestError(
            [Problem(where, None, None, "data.path", f"cannot open dataset: {reason}", hint)]
        ) from None


def _as_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        import io

        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def _passes_quality(row_quality: Any, minimum: int) -> bool:
    if not isinstance(row_quality, dict):
        return False
    return all(
        isinstance(row_quality.get(k), (int, float)) and row_quality[k] >= minimum
        for k in SUBJECTS200K_QUALITY_KEYS
    )


def load_hf_data(spec: HfData, data_path: str, where: str) -> TrainData:
    """Samples from a Hugging Face dataset; `where` locates errors (the config's `data` section)."""
    dataset = _open_hf(spec, data_path, where)
    columns = set(dataset.column_names)

    def column_problem(field: str, name: str) -> Problem:
        return Problem(
            where,
            None,
            None,
            field,
            f"the dataset has no column `{name}`",
            f"its columns: {', '.join(sorted(columns))}",
        )

    if spec.layout == "subjects200k":
        missing = [name for name in ("image", "description", "quality_assessment") if name not in columns]
        if missing:
            raise ManifestError([column_problem("data.layout", name) for name in missing])
        quality = dataset["quality_assessment"]
        rows = [i for i, q in enumerate(quality) if _passes_quality(q, spec.filter.min_quality)]
        if spec.limit is not None:
            rows = rows[: spec.limit]
        if not rows:
            raise ManifestError(
                [
                    Problem(
                        where,
                        None,
                        None,
                        "data.filter.min_quality",
                        f"no row passes the quality filter (of {len(dataset)} rows)",
                        "lower `data.filter.min_quality`",
                    )
                ]
            )
        padding = spec.padding

        def halves(row: int) -> tuple[Image.Image, Image.Image, Any]:
            item = dataset[row]
            image = _as_image(item["image"])
            side = image.height - 2 * padding
            if side <= 0 or image.width != 2 * side + 4 * padding:
                raise ValueError(
                    f"row {row}: a {image.width}x{image.height} image is not two {side}-px halves with "
                    f"{padding} px padding"
                )
            # Two panels side by side, each a side-px image framed by `padding` on all four sides (a row is
            # 2 x (side + 2 x padding) wide). The dataset authors' loader (OminiControl) starts the right
            # image at side + 2 x padding, in the right panel's frame: 8 px of padding and 8 columns short.
            left = image.crop((padding, padding, side + padding, side + padding))
            right = image.crop((side + 3 * padding, padding, 2 * side + 3 * padding, side + padding))
            return left, right, item["description"]

        # Each row is two samples, like OminiControl: each half is once the target, the other its reference.
        def load_half(index: int) -> Sample:
            row, side = rows[index // 2], index % 2
            left, right, description = halves(row)
            target, reference = (left, right) if side == 0 else (right, left)
            if isinstance(description, dict):
                instruction = description.get(f"description_{side}") or description.get("item") or ""
            else:
                instruction = str(description)
            return Sample(_sample_ids[index], [reference], instruction, target)

        _sample_ids = [f"row{row}-{'left' if side == 0 else 'right'}" for row in rows for side in (0, 1)]
        # Validate the first row's geometry now, so a wrong `padding` fails before any model loads.
        try:
            first_halves = halves(rows[0])
        except (ValueError, OSError) as error:
            raise ManifestError(
                [
                    Problem(
                        where,
                        None,
                        None,
                        "data.padding",
                        str(error),
                        "the real Subjects200K has 8 px padding; set `padding` to match",
                    )
                ]
            ) from None
        side_size = first_halves[0].size
        return TrainData(
            _sample_ids,
            load_half,
            lambda index: side_size,
            f"{len(_sample_ids)} samples from {len(rows)} of {len(dataset)} rows",
        )

    mapping = spec.columns
    problems = [
        column_problem(f"data.columns.{field}", name)
        for field, name in (
            ("references", mapping.references),
            ("instruction", mapping.instruction),
            ("target", mapping.target),
            ("id", mapping.id),
        )
        if name is not None and name not in columns
    ]
    if problems:
        raise ManifestError(problems)
    count = len(dataset) if spec.limit is None else min(spec.limit, len(dataset))
    if count == 0:
        raise ManifestError([Problem(where, None, None, "data.path", "the dataset has no rows")])
    ids = [str(v) for v in dataset[mapping.id][:count]] if mapping.id else [f"row{i}" for i in range(count)]
    if len(set(ids)) != len(ids):
        raise ManifestError(
            [
                Problem(
                    where,
                    None,
                    None,
                    "data.columns.id",
                    "the id column has duplicates",
                    "sample ids key the latent cache: make them unique",
                )
            ]
        )
    instructions = dataset[mapping.instruction][:count]
    bad = [i for i, text in enumerate(instructions) if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ManifestError(
            [
                Problem(
                    where,
                    None,
                    None,
                    "data.columns.instruction",
                    f"row {bad[0]} has no instruction ({len(bad)} rows in all)",
                )
            ]
        )

    def load(index: int) -> Sample:
        item = dataset[index]
        references = item[mapping.references]
        references = references if isinstance(references, list) else [references]
        return Sample(
            ids[index],
            [_as_image(r) for r in references],
            item[mapping.instruction],
            _as_image(item[mapping.target]),
        )

    # Decode the first row now, so a column of the wrong kind fails before any model loads.
    try:
        first = load(0)
    except (ValueError, OSError) as error:
        raise ManifestError(
            [
                Problem(
                    where,
                    None,
                    None,
                    "data.columns",
                    f"row 0 does not decode as images: {error}",
                    "`references` and `target` must be image columns (or lists of images)",
                )
            ]
        ) from None
    if not first.references:
        raise ManifestError(
            [Problem(where, None, None, "data.columns.references", "row 0 has no references")]
        )

    return TrainData(ids, load, lambda index: load(index).target.size, f"{count} samples")


def load_data(loaded: LoadedConfig) -> TrainData:
    """The config's training data, validated (raises `ManifestError` with located problems)."""
    spec = loaded.config.data
    if isinstance(spec, JsonlData):
        return load_jsonl_data(loaded.data_path)
    where = loaded.locate("data")
    file = where.file + (f":{where.line}" if where.line else "")
    return load_hf_data(spec, loaded.data_path, file)


# Buckets and batch order -----------------------------------------------------------------------------


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket (width, height) whose aspect ratio is closest to `size`'s (in log space)."""
    import math

    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover `bucket` (width, height) and centre-crop to it."""
    return ImageOps.fit(image, bucket, Image.Resampling.LANCZOS)


class BatchSchedule:
    """The deterministic batch order: `batch(k)` is the k-th batch of the run (a list of sample indices,
    all of one bucket), for any k, from (seed, epoch) alone."""

    def __init__(self, data: TrainData, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int):
        self.buckets = [(width, height) for width, height in buckets]
        self.batch_size = batch_size
        self.seed = seed
        if len(self.buckets) == 1:
            self.bucket_of = [0] * len(data)
        else:
            self.bucket_of = [nearest_bucket(data.size(i), self.buckets) for i in range(len(data))]
        self._epochs: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = random.Random(f"{self.seed}-{epoch}")
            batches = []
            for bucket in range(len(self.buckets)):
                members = [i for i, b in enumerate(self.bucket_of) if b == bucket]
                rng.shuffle(members)
                # Short last batches are kept: a few hundred samples should not lose a tail every epoch.
                batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            rng.shuffle(batches)
            self._epochs = {epoch: batches}  # one epoch at a time is enough
        return self._epochs[epoch]

    def batch(self, k: int) -> tuple[list[int], tuple[int, int]]:
        """The k-th batch and its bucket (width, height)."""
        epoch, position = divmod(k, self.batches_per_epoch)
        indices = self._epoch(epoch)[position]
        return indices, self.buckets[self.bucket_of[indices[0]]]
