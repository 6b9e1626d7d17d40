"""One image's record: the sidecar JSON and the PNG text chunks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from squeeze_cli.outputs.files import atomic_write_bytes, atomic_write_json, json_ready, strict_json_dumps
from squeeze_cli.outputs.layout import (
    image_name,
    image_path,
    sidecar_name,
    sidecar_path,
)
from squeeze_cli.reading import SIDECAR_MAX_BYTES, read_regular_file

if TYPE_CHECKING:
    from ..manifest.schema import MetadataLevel
    from ..plan import Job


PNG_PARAMETERS_KEY = "parameters"  # the chunk A1111, ComfyUI viewers and exiftool show
PNG_RECORD_KEY = "squeeze"  # the full JSON record
RECORD_FORMAT = 1  # bumped when a field changes meaning
# The sidecar's own field: the PNG's `{"size", "sha256", "mtime_ns", "inode"}`, which the PNG cannot carry
# about itself.
PNG_FILE_KEY = "png"
# The sidecar's record of the image's channel variants (`outputs/variants.py`), also a field of its
# `index.jsonl` line (`{name: file}` there).
VARIANTS_KEY = "variants"


def png_stamp(info: os.stat_result) -> dict[str, int]:
    """The PNG's `mtime_ns` and `inode` as its sidecar records them: with the size, a stat that matches
    them lets a resume trust the file without reading it (`resume.png_check`)."""
    return {"mtime_ns": info.st_mtime_ns, "inode": info.st_ino}


# ----------------------------------------------------------------------------------------------------
# Records, PNG metadata, saving an image
# ----------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine the pixels, read without importing them."""
    versions = {"python": sys.version.split()[0]}
    for name in ("squeeze_cli", "torch", "diffusers", "transformers", "accelerate", "peft", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "squeeze_cli" not in versions:
        from squeeze_cli import __version__

        versions["squeeze_cli"] = __version__
    return versions


def _steps_per_stage(stage_plan: Mapping[str, Any] | None) -> dict[str, int] | None:
    if stage_plan is None:
        return None
    counts = stage_plan["counts"]
    return {"mllm_only": counts[0], "mllm_and_reference": counts[1], "reference": counts[2]}


def image_record(
    job: Job,
    *,
    preset_name: str,
    model_info: Mapping[str, Any],
    stage_plan: Mapping[str, Any] | None,
    timings: Mapping[str, float | int],
    versions: Mapping[str, str] | None = None,
    pipeline: Mapping[str, Any] | None = None,
    license: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full record of one image: what the sidecar holds and the PNG's `squeeze` chunk embeds.

    Args:
        job (`Job`): the planned job the image was made for.
        preset_name (`str`): the model preset (`tiny`, `paper`, a path).
        model_info (`dict`): the resolved model section of the manifest (`ModelSpec.model_dump(mode="json")`).
        stage_plan (`dict`, *optional*): `StagePlan.to_dict()` of the denoising schedule; `None` for a
            pipeline without stages.
        timings (`dict`): seconds spent, e.g. `{"total": 3.6, "batch": 7.2, "batch_size": 2}`.
        versions (`dict`, *optional*): package versions; `package_versions()` when not given.
        pipeline (`dict`, *optional*): the pipeline that made the image: `name`, `class`,
            `distilled_guidance` and `sampling_parameters` (the params recorded are those it read).
        license (`dict`, *optional*): the weights' licence: `name`, `commercial_use` (`None`: unknown)
            and `url` (or `None`).
    """
    params = job.params.to_dict()
    if pipeline is not None:
        params = {key: value for key, value in params.items() if key in pipeline["sampling_parameters"]}
        pipeline = {**pipeline, "sampling_parameters": sorted(pipeline["sampling_parameters"])}
    return {
        "format": RECORD_FORMAT,
        "job_id": job.job_id,
        "job_index": job.index,
        "subject": job.subject,
        "subject_index": job.subject_index,
        "class_noun": job.class_noun,
        "prompt_index": job.prompt_index,
        "prompt": job.prompt,
        "seed": job.seed,
        "params": params,
        **({"pipeline": dict(pipeline)} if pipeline is not None else {}),
        "stage_plan": dict(stage_plan) if stage_plan is not None else None,
        "steps_per_stage": _steps_per_stage(stage_plan),
        "references": list(job.references),
        "quality": None,  # the identity gate's verdict (`gen/gate.py`), when the run has one
        "preset": preset_name,
        **({"license": dict(license)} if license is not None else {}),
        "model": json_ready(dict(model_info)),
        "versions": dict(versions) if versions is not None else package_versions(),
        # Counts stay integers (`batch_size`); seconds are rounded.
        "timings": {
            name: value if isinstance(value, int) else round(float(value), 4)
            for name, value in timings.items()
        },
        "files": {"image": image_name(job), "sidecar": sidecar_name(job)},  # relative to OUT
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _format_value(value: Any) -> str:
    text = str(value)
    # A1111's parser splits on ", " and ": "; it reads JSON-quoted values back as one value.
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def parameters_text(record: Mapping[str, Any]) -> str:
    """The `parameters` chunk, in the A1111 form image viewers and galleries read::

        <prompt>
        Negative prompt: <negative prompt>
        Steps: 28, Sampler: FlowMatchEuler, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 123, ...

    As Forge writes FLUX images: `CFG scale` is real classifier-free guidance (`true_cfg_scale` when a
    negative prompt uses it, else 1) and `Distilled CFG Scale` FLUX's distilled guidance (`guidance_scale`,
    for pipelines that have one), so A1111 readers do not take the latter for CFG. The negative prompt is
    written only when true CFG uses it: otherwise the pipeline ignores it and a reader would report it as
    used. `Pipeline` and `Model id` name the pipeline class and the checkpoint.
    """
    params = record.get("params", {})
    pipeline = record.get("pipeline") or {}
    true_cfg = params.get("true_cfg_scale") or 1.0
    uses_negative = true_cfg > 1 and bool(params.get("negative_prompt"))
    fields: dict[str, Any] = {
        "Steps": params.get("num_inference_steps"),
        "Sampler": "FlowMatchEuler",
        "CFG scale": true_cfg if uses_negative else 1,
        # A pipeline without distilled guidance (Qwen-Image) records no `guidance_scale`: None is left out.
        "Distilled CFG Scale": params.get("guidance_scale")
        if pipeline.get("distilled_guidance", True)
        else None,
        "Seed": record.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model": record.get("preset"),
    }
    thresholds = params.get("stage_thresholds")
    if thresholds is not None:
        fields["Stage thresholds"] = "/".join(str(t) for t in thresholds)
    stage_plan = record.get("stage_plan")
    if stage_plan:
        fields["Stage steps"] = "/".join(str(count) for count in stage_plan["counts"])
    if params.get("keep_mllm_condition"):
        fields["Keep MLLM condition"] = True
    if params.get("reference_size") is not None:
        fields["Reference size"] = params["reference_size"]
    step_cache = params.get("step_cache")
    if step_cache:
        settings = (f"{key}={value}" for key, value in step_cache.items() if key != "method")
        fields["Step cache"] = " ".join((step_cache["method"], *settings))
    fields["Pipeline"] = pipeline.get("class")
    fields["Model id"] = (record.get("model") or {}).get("pipeline")  # a hub id or folder, when one names it
    fields["Subject"] = record.get("subject")
    fields["Job id"] = record.get("job_id")
    version = (record.get("versions") or {}).get("squeeze_cli")
    if version:
        fields["Version"] = f"squeeze {version}"
    lines = [str(record.get("prompt", ""))]
    if uses_negative:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(
        ", ".join(f"{key}: {_format_value(value)}" for key, value in fields.items() if value is not None)
    )
    return "\n".join(lines)


def published_parameters(record: Mapping[str, Any], metadata: MetadataLevel) -> str | None:
    """The `parameters` text an image file carries at the `output.metadata` level: None with `none`;
    with `minimal`, without `Model id` when it is a folder on this machine (a hub id stays)."""
    if metadata == "none":
        return None
    model = record.get("model") or {}
    if metadata == "minimal" and os.path.isabs(str(model.get("pipeline") or "")):
        record = {**record, "model": {**model, "pipeline": None}}
    return parameters_text(record)


def png_text_chunks(record: Mapping[str, Any], metadata: MetadataLevel) -> PngImagePlugin.PngInfo:
    """The text chunks of a PNG at the `output.metadata` level.

    - `parameters`: `published_parameters` (tEXt, or iTXt when the prompt is not Latin-1), unless `none`;
    - `squeeze`: the full record as JSON (compressed iTXt, UTF-8), with `full` only: it holds the
      references' paths on this machine.
    """
    info = PngImagePlugin.PngInfo()
    parameters = published_parameters(record, metadata)
    if parameters is not None:
        info.add_text(PNG_PARAMETERS_KEY, parameters)
    if metadata == "full":
        info.add_itxt(PNG_RECORD_KEY, strict_json_dumps(record), zip=True)
    return info


def encode_png(image: Image.Image, record: Mapping[str, Any], metadata: MetadataLevel = "full") -> bytes:
    """PNG bytes of `image` with the record embedded in text chunks (`png_text_chunks`)."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_text_chunks(record, metadata))
    return buffer.getvalue()


def read_png_record(path: str | os.PathLike) -> dict[str, Any]:
    """The full record embedded in a PNG written by squeeze (reads the chunks, does not decode pixels).

    Raises:
        `ValueError`: when the file has no `squeeze` chunk or it is not a JSON object.
    """
    with Image.open(path) as image:
        text = image.info.get(PNG_RECORD_KEY)  # chunks before the pixel data; written there by encode_png
    if text is None:
        raise ValueError(f"{path} has no '{PNG_RECORD_KEY}' metadata chunk: it was not written by squeeze")
    record = json.loads(str(text))
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the '{PNG_RECORD_KEY}' metadata chunk is not a JSON object")
    return record


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The A1111-style `parameters` text of a PNG, or None."""
    with Image.open(path) as image:
        text = image.info.get(PNG_PARAMETERS_KEY)
    return None if text is None else str(text)


def save_image(
    out_dir: str | os.PathLike,
    job: Job,
    image: Image.Image,
    record: Mapping[str, Any],
    metadata: MetadataLevel = "full",
) -> Path:
    """Write the PNG (atomically, its metadata at the `output.metadata` level) and then its sidecar
    (atomically); returns the PNG's path.

    The order is the resume guarantee: the sidecar is the "done" marker, so it is written only once the
    PNG is complete and in place. The sidecar is `record` plus the PNG's size, sha256, mtime and inode
    (`png`), which a resume checks against the file on disk.
    """
    png = image_path(out_dir, job)
    data = encode_png(image, record, metadata)
    atomic_write_bytes(png, data)
    sidecar = dict(record)
    sidecar[PNG_FILE_KEY] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **png_stamp(os.stat(png)),
    }
    atomic_write_json(sidecar_path(out_dir, job), sidecar)
    return png


# ----------------------------------------------------------------------------------------------------
# Resume (the search for finished jobs is in `resume.py`)
# ----------------------------------------------------------------------------------------------------


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar's record, or None when it is missing, unreadable or not a JSON object.

    A symbolic link, a FIFO or another special file, a file over the size limit and JSON nested too deep
    for the parser all count as a damaged sidecar: the job is made again (and the file replaced).
    """
    try:
        # Decoded first: `json.loads` of bytes guesses the encoding, a third of a small sidecar's parse.
        record = json.loads(read_regular_file(path, SIDECAR_MAX_BYTES, follow_symlinks=False).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    return record if isinstance(record, dict) else None
