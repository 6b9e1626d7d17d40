"""The export's dataset card: `README.md` with the YAML header the Hugging Face Hub reads, how the images
were made (the run's resolved manifest, the squeeze version) and the selection that chose them."""

from __future__ import annotations

import re
from typing import Any

import yaml

from squeeze_cli.export.rows import RunImages
from squeeze_cli.logs import counted
from squeeze_cli.manifest.recipes import UNKNOWN_LICENSE, License


def size_category(rows: int) -> str:
    """The Hub's `size_categories` value for `rows` rows."""
    for bound, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < bound:
            return name
    return "1M<n<10M"


COLUMNS = (
    "`image`, `prompt` (the caption), `subject`, `class`, `prompt_index`, `seed`, `job_id`, `recipe`, "
    "`model_identity`, `model` (the resolved model section, JSON), `license`, `references` (paths, or the "
    "images with `--with-references`), `variants` (JSON, when the run made channel variants)"
)


# Licence names recipes use that the Hub knows by an id of its own; any other is `other`, named and linked.
HUB_LICENSE_IDS = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "openrail", "openrail++"}


def license_header(license_: License) -> dict[str, str]:
    """The card header's licence keys for the recipe's licence."""
    if license_.name.lower() in HUB_LICENSE_IDS:
        return {"license": license_.name.lower()}
    if license_ == UNKNOWN_LICENSE:
        return {"license": "other"}
    slug = "-".join("".join(c if c.isalnum() else " " for c in license_.name.lower()).split())
    return {
        "license": "other",
        "license_name": slug,
        **({"license_link": license_.url} if license_.url else {}),
    }


def dataset_card(images: RunImages, state: dict[str, Any], *, version: str) -> str:
    """The card's text for an export with `state` (see `folder.py`) of the run `images`."""
    total = len(state["job_ids"])
    selection = state["selection"]
    loaded = images.plan.loaded
    header = {
        **license_header(loaded.license),
        "task_categories": ["text-to-image", "image-to-image"],
        "size_categories": [size_category(total)],
        "tags": ["synthetic", "subject-driven-generation", "squeeze"],
        "pretty_name": f"squeeze export of {images.out.name}",
    }
    split = ", ".join(f"{name}={value}" for name, value in selection["split"].items()) or "none"
    rows = ", ".join(f"{name}: {count}" for name, count in sorted(state["rows"].items())) or "none"
    metrics = ", ".join(f"`{name}`" for name in selection["metrics"])
    recipe = loaded.recipe.source if loaded.recipe is not None else "the manifest's own model section"
    licence = (
        "No licence is recorded in the recipe: the terms of the model that made the images apply."
        if loaded.license == UNKNOWN_LICENSE
        else f"Licence of the weights that made the images, from the recipe: {loaded.license.name}"
        + (f" ({loaded.license.url})" if loaded.license.url else "")
        + {True: "; commercial use allowed.", False: "; no commercial use.", None: "."}[
            loaded.license.commercial_use
        ]
    )
    manifest = images.plan.manifest.read_text(encoding="utf-8").rstrip()
    # A fence longer than any run of backticks in the manifest (a prompt may hold ```): else it ends there.
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", manifest)), default=0))
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {header['pretty_name']}",
        "",
        f"{counted(total, 'image')} of {counted(len(state['subject_splits']), 'subject')}, made by squeeze "
        f"{version} with the recipe `{recipe}` (model identity `{loaded.model_identity}`), exported as "
        f"`{selection['format']}` from `{selection['run']}`. Only finished images of the run's current "
        "plan are here; grids and contact sheets never are.",
        "",
        licence,
        "",
        "## Selection",
        "",
        f"- `--where`: `{selection['where']}`" if selection["where"] else "- `--where`: none",
        f"- `--subjects`: `{selection['subjects']}`" if selection["subjects"] else "- `--subjects`: all",
        f"- split by subject: {split} (seed {selection['seed']}); rows per split: {rows}",
        "",
        "## Columns",
        "",
        COLUMNS + (f", and the `squeeze eval` scores {metrics}." if metrics else "."),
        "",
        "## How it was made",
        "",
        "`squeeze gen` on the run's `manifest.resolved.yaml`, below, makes these images again:",
        "",
        f"{fence}yaml",
        manifest,
        fence,
        "",
    ]
    return "\n".join(lines)
