"""Per-image scores of a run, cached in the run directory, and their summaries.

The cache (`OUT/metrics-cache.json`) maps (image content, metric model, reference contents, CLIP-T text)
to that model's raw scores, so a re-run computes nothing and a grown run computes only its new images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import UsageError
from squeeze_cli.eval.gated import gate_summary, refuse_gated_runs
from squeeze_cli.eval.report import mean_metrics
from squeeze_cli.eval.rundir import RunContents, RunImage, unreadable
from squeeze_cli.metrics.protocol import EncoderSpec, Protocol
from squeeze_cli.processes import together
from squeeze_cli.reading import INDEX_MAX_BYTES, file_kind, open_regular_file, read_regular_file

# 2: DINO preprocessed exactly as torchvision and with the release's LayerNorm epsilon (other scores).
CACHE_FORMAT = 2
# The files eval writes in a run: the temporaries of these that a killed eval left are removed.
EVAL_FILE_NAMES = (
    outputs.METRICS_CACHE_NAME,
    outputs.METRICS_JSONL_NAME,
    outputs.METRICS_JSON_NAME,
    outputs.REPORT_NAME,
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class RunEvaluation:
    """The scores of one run: `rows` (one per image, in metrics.jsonl form) and the summary."""

    contents: RunContents
    protocol: Protocol
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    computed: int = 0  # (image, model) scores computed now
    reused: int = 0  # ... and taken from the cache
    notes: list[str] = field(default_factory=list)
    name: str = ""  # how tables and the report call the run


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes: the cache follows the pixels, not the name."""
    digest = hashlib.sha256()
    with open_regular_file(path) as file:  # a FIFO or a device: refused at once, never read
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clip_t_text(image: RunImage) -> str:
    """The prompt CLIP-T scores: the subject's name replaced by its class noun, as DreamBench does with
    its unique token (`a sks dog` is scored as `a dog`). Prompts written with `{class}` are unchanged."""
    if not image.class_noun or image.subject == image.class_noun:
        return image.prompt
    noun = image.class_noun  # a function, not a template: a backslash in the noun is not an escape
    return re.sub(rf"(?<![\w-]){re.escape(image.subject)}(?![\w-])", lambda _: noun, image.prompt)


def reference_paths(image: RunImage, protocol: Protocol) -> list[str]:
    """The references `image` is compared with: its conditioning images, or its subject's folder."""
    if protocol.references == "conditioning":
        return list(image.references)
    folder = Path(protocol.references) / image.subject
    if not folder.is_dir():
        return []
    # Not hidden names: macOS's `._00.jpg` beside `00.jpg` is no photo (as `squeeze dreambench` reads).
    return [
        str(p)
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
    ]


def _cache_key(spec: EncoderSpec, image_hash: str, reference_hashes: Sequence[str], text: str | None) -> str:
    payload = json.dumps([spec.fingerprint(), image_hash, list(reference_hashes), text])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _read_cache(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The cached scores; no cache, or a broken one (an endless or deep file, wrong types, NaN): nothing
    cached, and what is not usable is recomputed. A symbolic link there is not followed (the cache is the
    run's own: the write replaces the link); a FIFO or a folder was refused before scoring
    (`check_eval_files`)."""
    try:
        data = json.loads(
            read_regular_file(
                run_dir / outputs.METRICS_CACHE_NAME, INDEX_MAX_BYTES, follow_symlinks=False
            ).decode("utf-8"),
            parse_constant=_refuse_constant,
        )
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != CACHE_FORMAT
        or not isinstance(data.get("scores"), dict)
    ):
        return {}
    return {key: scores for key, scores in data["scores"].items() if _valid_scores(scores)}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _cosine(value: Any) -> bool:
    """A score `score_images` can give: every one is a cosine of L2-normalised embeddings (or a mean of
    them), so a number in [-1, 1], give or take float rounding."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= 1 + 1e-4
    )


def _valid_scores(scores: Any) -> bool:
    """Whether a cache entry has the shape `score_images` returns: finite numbers, or null for a score
    that was NaN."""
    if not isinstance(scores, dict):
        return False
    for name, value in scores.items():
        if name == "per_reference":
            if not isinstance(value, list) or not all(item is None or _cosine(item) for item in value):
                return False
        elif name not in ("identity", "copy", "text_cosine") or not (value is None or _cosine(value)):
            return False
    return True


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def score_images(
    encoder: Any,
    images: Sequence[Any],
    references: Sequence[Sequence[Any]],
    texts: Sequence[str | None],
) -> list[dict[str, Any]]:
    """Raw scores of one model for a batch: `images` (PIL), each with its references' embeddings.

    Args:
        encoder (`Encoder`): the loaded model.
        references: per image, the `ImageEmbeddings` of each of its references (batch of one each).
        texts: per image, the CLIP-T text (CLIP only).

    Returns:
        `list[dict]`: per image, `identity` (mean cosine over the references) and `per_reference`;
        `copy` for DINO; `text_cosine` for CLIP.
    """
    role = encoder.spec.role
    embedded = encoder.embed_images(images)
    text_embeddings = encoder.embed_texts(texts) if role == "clip" else None
    results = []
    for i, image_refs in enumerate(references):
        scores: dict[str, Any] = {}
        if image_refs:
            cosines = [float(embedded.global_[i] @ ref.global_[0]) for ref in image_refs]
            scores["per_reference"] = cosines
            scores["identity"] = _mean(cosines)
            if role == "dino":
                # Spatially aligned patches: high when the same parts sit at the same places (a paste).
                aligned = [float((embedded.patches[i] * ref.patches[0]).sum(-1).mean()) for ref in image_refs]
                scores["copy"] = max(aligned)
        if text_embeddings is not None:
            scores["text_cosine"] = float(embedded.global_[i] @ text_embeddings[i])
        results.append(scores)
    return results


def evaluate_run(
    contents: RunContents,
    protocol: Protocol,
    *,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    encoder_factory: Callable[[EncoderSpec, str], Any] | None = None,
    processes: Any = None,
    rules: outputs.RuleSet | None = None,
    variant: str | None = None,
    verify: bool = False,
) -> RunEvaluation:
    """Score every finished image of a run; write `metrics.jsonl`, `metrics.json` and the cache.

    Models are loaded only when something is not cached. Images whose references are all gone get no
    identity scores (noted); their CLIP-T is still computed. With `processes` (several processes of
    `accelerate launch`), the uncached images are split between them and only the main one writes.
    With `rules`, each image (its master, or its channel `variant`) is also checked against them, as
    `squeeze check` does: a row's `check`, the summary's `checks` counts (main process only). With
    `verify`, every reference photo is read, not trusted from the run's `.squeeze-references.json`.
    """
    from squeeze_cli.manifest.reference_facts import ReferenceFacts

    run_dir = contents.path
    cache = _read_cache(run_dir)
    notes: list[str] = []
    hashes: dict[str, str | None] = {}
    # What gen learned of the reference photos (OUT/.squeeze-references.json): a photo unchanged since
    # (its stat) is neither checked nor hashed again, unless `verify`.
    references = ReferenceFacts(None if verify else run_dir)

    def hash_of(path: str) -> str | None:
        if path not in hashes:
            # The checks gen makes of a reference (a regular file, its header's size, complete data),
            # so a FIFO, /dev/zero, a bomb or a file that is no image is left out, never read or decoded.
            reason = references.check(path)
            if reason is None:
                try:
                    hashes[path] = references.digest(path).hex()  # checked above: read once at most
                except OSError as error:
                    reason = f"cannot read it: {error.strerror or error}"
            if reason is not None:
                hashes[path] = None
                notes.append(f"reference {path} cannot be read ({reason}): left out")
        return hashes[path]

    plan = []  # per image: (image, image hash, its reference paths, their hashes, text)
    for image in contents.images:
        try:
            # The sidecar's sha256 of a PNG it vouches for (`read_run`): not read again.
            image_hash = image.sha256 or file_hash(run_dir / image.image)
        except OSError as error:
            contents.missing.append(f"{image.image}: cannot be read ({error.strerror or error})")
            continue
        refs = [r for r in reference_paths(image, protocol) if hash_of(r) is not None]
        ref_hashes = [h for r in refs if (h := hashes[r]) is not None]
        text = clip_t_text(image)
        if image.unread and not all(
            _cache_key(spec, image_hash, ref_hashes, text if spec.role == "clip" else None) in cache
            for spec in protocol.encoders
        ):
            # Trusted by its stat, unread: checked before it is decoded, so a bomb or a damaged file
            # (changed with its mtime put back) is listed, never decoded.
            reason = unreadable(run_dir / image.image)
            if reason is not None:
                contents.missing.append(f"{image.image}: {reason}")
                continue
        if not refs:
            notes.append(f"{image.image}: no reference image to compare with: identity not scored")
        plan.append((image, image_hash, refs, ref_hashes, text))

    raw: dict[tuple[int, str], dict[str, Any]] = {}
    computed = reused = 0
    is_main = processes is None or processes.is_main
    # With several processes, each scores every count-th image; everyone gets all the scores. A refusal of
    # some processes alone (the encoder of a process with images to score, the main process's writes) ends
    # every process (`processes.together`): none waits for them in the next collective.
    index, count = (processes.index, processes.count) if processes is not None else (0, 1)
    if is_main:  # what a killed eval left (the temporaries of its own files, by dead processes only)
        outputs.remove_stale_temp_files(run_dir, only=EVAL_FILE_NAMES)
    for spec in protocol.encoders:
        todo = []
        for position, (_, image_hash, _, ref_hashes, text) in enumerate(plan):
            key = _cache_key(spec, image_hash, ref_hashes, text if spec.role == "clip" else None)
            if key in cache:
                raw[position, spec.role] = cache[key]
                reused += 1
            else:
                todo.append((position, key))
        if not todo:
            continue  # every process sees the same cache and plan, so all skip the gather together
        mine = todo[index::count]

        def score_mine(spec: EncoderSpec = spec, mine: list[tuple[int, str]] = mine) -> dict[str, Any]:
            if not mine:
                return {}
            encoder = (encoder_factory or _load_encoder)(spec, device or _default_device())
            return _score_with(encoder, mine, plan, run_dir, batch_size, progress and index == 0)

        scores = together(score_mine, index, count)
        if processes is not None and count > 1:
            scores = {key: value for part in processes.gather(scores) for key, value in part.items()}
        for position, key in todo:
            raw[position, spec.role] = cache[key] = scores[key]
        computed += len(todo)

    def finish() -> RunEvaluation:
        if computed and is_main:
            outputs.atomic_write_json(
                run_dir / outputs.METRICS_CACHE_NAME, {"format": CACHE_FORMAT, "scores": cache}
            )
        rows = [
            _row(plan[i], protocol, {role: raw.get((i, role), {}) for role in _roles(protocol)})
            for i in range(len(plan))
        ]
        summary = summarise(rows, protocol, contents, notes)
        if rules is not None and is_main:
            summary["checks"] = check_rows(rows, run_dir, [image for image, *_ in plan], rules, variant)
        evaluation = RunEvaluation(contents, protocol, rows, summary, computed, reused, notes)
        summary["cache"] = {"computed": computed, "reused": reused}
        if is_main:
            write_metrics(evaluation)
        return evaluation

    return together(finish, index, count)


def check_rows(
    rows: Sequence[dict[str, Any]],
    run_dir: Path,
    images: Sequence[RunImage],
    rules: outputs.RuleSet,
    variant: str | None,
) -> dict[str, Any]:
    """Each image against `rules` (`outputs.check_job_image`: the measuring of `squeeze check`), into its
    row's `check`; returns the run's counts: `{rules, variant, passed, failed}`."""
    checks = []
    for row, image in zip(rows, images, strict=True):
        check = outputs.check_job_image(run_dir, image.image, image.variants, rules, variant)
        row["check"] = check.to_dict()
        checks.append(check)
    counts = outputs.CheckReport(rules, variant, checks).to_dict()
    del counts["images"]  # they are in the rows
    return counts


def _score_with(
    encoder: Any,
    todo: Sequence[tuple[int, str]],
    plan: Sequence[tuple],
    run_dir: Path,
    batch_size: int,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """`{cache key: raw scores}` of one model for the planned images in `todo`, in batches."""
    from squeeze_cli.images import load_rgb

    scores: dict[str, dict[str, Any]] = {}
    reference_cache: dict[str, Any] = {}
    bar = _progress(len(todo), f"{encoder.spec.role} {Path(encoder.spec.model_id).name}", progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pil_images, ref_embeddings, texts = [], [], []
        for position, _ in chunk:
            image, _, refs, _, text = plan[position]
            pil_images.append(load_rgb(run_dir / image.image))
            for ref in refs:
                if ref not in reference_cache:
                    reference_cache[ref] = encoder.embed_images([_load_reference(ref)])
            ref_embeddings.append([reference_cache[ref] for ref in refs])
            texts.append(text)
        results = score_images(encoder, pil_images, ref_embeddings, texts)
        for (_, key), result in zip(chunk, results, strict=True):
            scores[key] = outputs.json_ready(result)  # a NaN score (a blank image) is no score: null
        bar.update(len(chunk))
    bar.close()
    return scores


def _load_reference(path: str) -> Any:
    """A reference photo whose check passed, decoded; one that does not decode was trusted by its stat
    (`.squeeze-references.json`, a file of the run's) and is no longer what was checked."""
    from PIL import Image

    from squeeze_cli.images import load_rgb
    from squeeze_cli.manifest.reference_facts import REFERENCE_CACHE_NAME

    try:
        return load_rgb(path)
    except (OSError, Image.DecompressionBombError) as error:
        raise UsageError(
            f"reference {path} cannot be decoded ({error}), though its check was trusted from the run's "
            f"{REFERENCE_CACHE_NAME}",
            "run squeeze eval --verify, which checks every reference again and leaves out what fails",
        ) from error


def _roles(protocol: Protocol) -> list[str]:
    return [spec.role for spec in protocol.encoders]


def _row(planned: tuple, protocol: Protocol, raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    image, _, refs, _, text = planned
    row: dict[str, Any] = {
        "job_id": image.job_id,
        "subject": image.subject,
        "prompt_index": image.prompt_index,
        "seed": image.seed,
        "prompt": image.prompt,
        "clip_t_text": text,
        "image": image.image,
        "references": refs,
        "gated": image.gate is not None,  # chosen by gen's identity gate (squeeze_cli/eval/gated.py)
        **({"gate_attempts": image.gate.attempts} if image.gate is not None else {}),
    }
    dino, clip, dinov2 = raw.get("dino", {}), raw.get("clip", {}), raw.get("dinov2", {})
    for name in protocol.metrics():
        value = {
            "dino": dino.get("identity"),
            "clip_i": clip.get("identity"),
            "clip_t": None
            if clip.get("text_cosine") is None
            else protocol.clip_t_weight * max(clip["text_cosine"], 0.0),
            "dinov2": dinov2.get("identity"),
            "copy": dino.get("copy"),
        }[name]
        row[name] = value
    if "per_reference" in dino:
        row["dino_per_reference"] = dino["per_reference"]
    return row


def summarise(
    rows: Sequence[dict[str, Any]], protocol: Protocol, contents: RunContents, notes: Sequence[str]
) -> dict[str, Any]:
    """`metrics.json`: the protocol, the means per prompt, per subject and overall (over images), and
    what was not evaluated (failed jobs, missing files)."""
    metrics = protocol.metrics()
    subjects: dict[str, list] = {}
    prompts: dict[tuple[str, int], list] = {}
    for row in rows:
        subjects.setdefault(row["subject"], []).append(row)
        prompts.setdefault((row["subject"], row["prompt_index"]), []).append(row)
    return {
        "format": 1,
        "run": str(contents.path),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": protocol.to_dict(),
        "metrics": metrics,
        "images": len(rows),
        "recipe": contents.recipe,  # every image is of one model identity (`read_run`)
        "gate": gate_summary(contents),
        "overall": mean_metrics(rows, metrics),
        # Per metric, the images without a value (no reference left to compare with, a NaN): left out of
        # its means, which are then over fewer images than `images` says.
        "unscored": {m: n for m in metrics if (n := sum(row.get(m) is None for row in rows))},
        "subjects": {
            name: {"images": len(group), **mean_metrics(group, metrics)}
            for name, group in sorted(subjects.items())
        },
        "prompts": [
            {
                "subject": s,
                "prompt_index": p,
                "prompt": group[0]["prompt"],
                "images": len(group),
                **mean_metrics(group, metrics),
            }
            for (s, p), group in sorted(prompts.items())
        ],
        "failed": [
            {k: entry.get(k) for k in ("job_id", "subject", "prompt_index", "seed", "error")}
            for entry in contents.failed
        ],
        "missing": list(contents.missing),
        "stale": list(contents.stale),
        "pending": contents.pending,
        "notes": list(notes),
    }


def write_metrics(evaluation: RunEvaluation) -> None:
    """`metrics.jsonl` (one line per image) and `metrics.json` (the summary), atomically, in the run.

    By their plain names in the run's real folder (`read_run` resolved it), not through `safe_join`, which
    follows a link at the name: the rename replaces a link there (`check_eval_files`), never writes
    through it.
    """
    run_dir = evaluation.contents.path
    lines = "".join(outputs.strict_json_dumps(row) + "\n" for row in evaluation.rows)
    outputs.atomic_write_text(run_dir / outputs.METRICS_JSONL_NAME, lines)
    outputs.atomic_write_json(run_dir / outputs.METRICS_JSON_NAME, evaluation.summary)


def check_eval_files(run_dir: Path, names: Sequence[str] = EVAL_FILE_NAMES) -> None:
    """Refuse, before any scoring, a run where one of eval's files (`names`) is a folder, a FIFO, a device
    or a socket: the rename that writes it would fail after every score was computed. A symbolic link
    there is fine: eval's files are its own, rewritten whole, and the rename replaces the link (a cache
    link to /dev/zero or to a shared cache elsewhere is neither read nor written through).

    A run folder eval cannot write in (a read-only file system, another user's run) is refused too: the
    write would otherwise fail after every score was computed, with gen's advice for its own output.

    Raises:
        `UsageError`: naming the file and what it is, or the folder (exit 2).
    """
    # A file created and removed, as the writes will: permission bits alone do not say (root, ACLs, NFS).
    # Named as the writes' temporaries are, so a killed eval's is removed by the next (`evaluate_run`).
    probe = run_dir / f".{outputs.METRICS_JSON_NAME}.{os.getpid()}.tmp"
    try:
        probe.unlink(missing_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"{run_dir}: cannot write there ({error.strerror or error}), and squeeze eval writes its "
            f"{', '.join(names)} into the run",
            f"copy the run to a folder you can write (cp -r {run_dir} COPY) and evaluate the copy, or make "
            "the folder writable",
        ) from error
    for name in names:
        try:
            mode = os.lstat(run_dir / name).st_mode
        except OSError:
            continue  # absent, or unreadable: the write itself says so, naming the file
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UsageError(
                f"{run_dir / name} is {file_kind(mode)}, not a regular file",
                f"move it out of the run or remove it: squeeze eval writes its {name} there",
            )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_encoder(spec: EncoderSpec, device: str) -> Any:
    import torch

    from squeeze_cli.metrics.encoders import Encoder

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device!r}: not a device", "use cuda, cuda:1, cpu, ...") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: no CUDA device on this machine", "use --device cpu, or leave it out"
        )
    return Encoder(spec, device)


def _progress(total: int, label: str, enabled: bool) -> Any:
    from squeeze_cli.logs import progress_bar

    return progress_bar(total, label, unit="img", enabled=enabled, leave=False)


def read_runs(paths: Sequence[str | Path], *, report: bool = True, verify: bool = False) -> list[RunContents]:
    """Every run read and eval's files in it checked (`check_eval_files`): the cheap checks, so that a bad
    run stops before a metric model is built. With `verify`, every image is hashed and checked
    (`read_run`), not only those whose stat differs from their sidecar's."""
    from squeeze_cli.eval.rundir import read_run

    runs = [read_run(path, verify=verify) for path in paths]
    names = [name for name in EVAL_FILE_NAMES if report or name != outputs.REPORT_NAME]
    for contents in runs:
        check_eval_files(contents.path, names)
    return runs


def evaluate_runs(
    runs: Sequence[RunContents],
    protocol: Protocol,
    *,
    batch_size: int = 16,
    device: str | None = None,
    report: bool = True,
    progress: bool = True,
    allow_gated: bool = False,
    rules: outputs.RuleSet | None = None,
    variant: str | None = None,
    verify: bool = False,
) -> list[RunEvaluation]:
    """Evaluate each run (`read_runs`' runs), then write each run's `report.html`, holding every run
    evaluated together side by side. With `rules`, each image is also checked against them
    (`evaluate_run`); with `verify`, every image is hashed and checked.

    Raises:
        `GatedRunError`: before any work, when a run's images were chosen by gen's identity gate, the
            protocol is `dreambench` and `allow_gated` is not set.
    """
    from squeeze_cli.eval.report import write_report
    from squeeze_cli.processes import Processes as _Processes

    refuse_gated_runs(runs, protocol, allow_gated)
    processes = _Processes()
    if device is None and processes.count > 1:
        device = processes.device("auto")  # this process's GPU
    loaded: dict[EncoderSpec, Any] = {}  # each model loads once for all the runs

    def shared_encoder(spec: EncoderSpec, device: str) -> Any:
        if spec not in loaded:
            loaded[spec] = _load_encoder(spec, device)
        return loaded[spec]

    evaluations = [
        evaluate_run(
            contents,
            protocol,
            batch_size=batch_size,
            device=device,
            progress=progress,
            encoder_factory=shared_encoder,
            processes=processes,
            rules=rules,
            variant=variant,
            verify=verify,
        )
        for contents in runs
    ]
    if not processes.is_main:
        return []  # the main process writes and reports
    names = _run_names([run.path for run in runs])
    for evaluation, name in zip(evaluations, names, strict=True):
        evaluation.name = name
    if report:
        table = [(e.name, e.contents.path, e.summary, e.rows) for e in evaluations]
        for evaluation in evaluations:
            write_report(table, evaluation.contents.path)
    return evaluations


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Short names for runs: the folder names, or the paths when two folders share a name."""
    names = [path.name or str(path) for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]
