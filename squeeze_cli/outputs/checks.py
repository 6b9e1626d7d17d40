"""Marketplace checks (`squeeze check`): a run's images measured against a rule set, each image passing or
failing with the numbers measured.

A rule set is data: a YAML file, packaged (`squeeze_cli/outputs/rules/`, e.g. `amazon-main`) or your own
(a path). Its rules, each checked only when present:

- `border_background`: the share of the outermost ring of pixels that is exactly the `background` colour;
- `min_fill`: how far the product spans the frame, along the side it spans most (its bounding box over the
  frame's width or height); the product is every pixel that differs from `background` by more than
  `product_difference` in a channel;
- `min_longest_side`: the image's longer side, in pixels.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from PIL import Image, ImageChops, UnidentifiedImageError
from pydantic import AfterValidator, Field, StrictInt, StrictStr

from squeeze_cli.errors import EXIT_INVALID, ManifestError, SqueezeError
from squeeze_cli.manifest.located import load_yaml
from squeeze_cli.manifest.recipes import is_file_path
from squeeze_cli.manifest.schema import StrictModel, non_empty
from squeeze_cli.manifest.schema_errors import schema_error, validate_schema
from squeeze_cli.outputs.index import read_index
from squeeze_cli.outputs.layout import INDEX_NAME, UnsafeOutputPathError, safe_join
from squeeze_cli.outputs.records import VARIANTS_KEY
from squeeze_cli.outputs.run_plan import RunPlan, not_a_run_folder, run_folder_hint
from squeeze_cli.reading import MANIFEST_MAX_BYTES, open_regular_file, read_regular_file

RULES_PACKAGE = "squeeze_cli.outputs"
RULES_FOLDER = "rules"
Share = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]  # not `yes` or "0.5", as in a manifest
Channel = Annotated[StrictInt, Field(ge=0, le=255)]


class RulesError(SqueezeError):
    """An unknown rule set, or a rules file that cannot be read."""

    exit_code = EXIT_INVALID


def _one_line(value: str) -> str:
    # The name starts every line `check` prints: a newline in it would print lines of its own.
    if not value.isprintable():
        raise schema_error("must be one line of printable characters")
    return value


class RuleSet(StrictModel):
    """The schema of a rules file."""

    name: Annotated[StrictStr, AfterValidator(non_empty), AfterValidator(_one_line)]
    description: StrictStr = ""
    background: tuple[Channel, Channel, Channel] = (255, 255, 255)
    border_background: Share | None = None
    min_fill: Share | None = None
    product_difference: Annotated[StrictInt, Field(ge=0, le=254)] = 10
    min_longest_side: Annotated[StrictInt, Field(ge=1)] | None = None


@dataclass
class ImageCheck:
    """One image against a rule set: the numbers measured and the rules it breaks (none: it passes)."""

    image: str  # relative to OUT
    measured: dict[str, float | int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    error: str | None = None  # the image could not be read (or is missing): it fails

    @property
    def passed(self) -> bool:
        return not self.failed and self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "passed": self.passed,
            "measured": self.measured,
            "failed": self.failed,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class CheckReport:
    """Every image of a run checked against one rule set."""

    rules: RuleSet
    variant: str | None  # None: the PNG masters
    images: list[ImageCheck]

    @property
    def failed(self) -> int:
        return sum(not check.passed for check in self.images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": self.rules.name,
            "variant": self.variant,
            "passed": len(self.images) - self.failed,
            "failed": self.failed,
            "images": [check.to_dict() for check in self.images],
        }


def packaged_rules() -> dict[str, Any]:
    """`{name: file}` of the rule sets shipped with squeeze."""
    folder = importlib.resources.files(RULES_PACKAGE) / RULES_FOLDER
    return {entry.name.rsplit(".", 1)[0]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def load_rules(name_or_path: str) -> RuleSet:
    """A packaged rule set by name, or a rules file by path (`.yaml`, or containing `/`).

    Raises:
        `RulesError`: unknown name (the message lists the known ones) or unreadable file.
        `ManifestError`: the file has problems, each located in it.
    """
    if is_file_path(name_or_path):
        path = Path(name_or_path).expanduser()
        try:
            text = read_regular_file(path, MANIFEST_MAX_BYTES).decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "it is not UTF-8 text"
            hint = None
            if isinstance(error, FileNotFoundError):
                known = ", ".join(sorted(packaged_rules()))
                hint = f"a path is relative to the current folder; the packaged rule sets: {known}"
            raise RulesError(f"cannot read rules file {str(path)!r}: {reason}", hint) from None
        display = str(path)
    else:
        packaged = packaged_rules()
        if name_or_path not in packaged:
            raise RulesError(
                f"unknown rule set {name_or_path!r}",
                f"known rule sets: {', '.join(sorted(packaged))}; or give the path of a .yaml file",
            )
        text, display = packaged[name_or_path].read_text(encoding="utf-8"), f"rules/{name_or_path}.yaml"
    document = load_yaml(
        text, display, empty_hint="a rules file needs at least a `name` (docs/outputs.md, Marketplace checks)"
    )
    if document.problems:
        raise ManifestError(document.problems)
    parsed, problems = validate_schema(RuleSet, document)
    if problems or not isinstance(parsed, RuleSet):
        raise ManifestError(problems)
    return parsed


def measure(image: Image.Image, rules: RuleSet) -> dict[str, float | int]:
    """The numbers the rule set asks about, measured on `image`."""
    measured: dict[str, float | int] = {"longest_side": max(image.size)}
    rgb = image.convert("RGB")
    # Per pixel, the largest channel difference from the background.
    red, green, blue = ImageChops.difference(rgb, Image.new("RGB", rgb.size, rules.background)).split()
    largest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    if rules.border_background is not None:
        measured["border_background"] = round(_border_share(largest), 4)
    if rules.min_fill is not None:
        product = largest.point(lambda value: 255 if value > rules.product_difference else 0).getbbox()
        width, height = rgb.size
        fill = (
            0.0
            if product is None
            else max((product[2] - product[0]) / width, (product[3] - product[1]) / height)
        )
        measured["fill"] = round(fill, 4)
    return measured


def _border_share(largest: Image.Image) -> float:
    """The share of the outermost ring of pixels whose largest difference from the background is 0."""
    width, height = largest.size
    inner = largest.crop((1, 1, width - 1, height - 1)) if width > 2 and height > 2 else None
    ring = width * height - (inner.size[0] * inner.size[1] if inner is not None else 0)
    exact_all = largest.histogram()[0]
    exact_inner = inner.histogram()[0] if inner is not None else 0
    return (exact_all - exact_inner) / ring


def broken_rules(measured: Mapping[str, float | int], rules: RuleSet) -> list[str]:
    """The rules `measured` breaks, by name."""
    limits = {
        "border_background": ("border_background", rules.border_background),
        "min_fill": ("fill", rules.min_fill),
        "min_longest_side": ("longest_side", rules.min_longest_side),
    }
    return [rule for rule, (key, limit) in limits.items() if limit is not None and measured[key] < limit]


# What to do with a file that does not read: `gen` makes a missing image or variant again.
REMAKE = "remove it, and `squeeze gen` on the run makes it again"


def check_file(out_dir: Path, image: str, rules: RuleSet) -> ImageCheck:
    """One image (a name relative to `out_dir`) against `rules`."""
    check = ImageCheck(image)
    try:
        # A regular file only: a FIFO at an image's name must not hang the check.
        with open_regular_file(safe_join(out_dir, *image.split("/"))) as file, Image.open(file) as opened:
            check.measured = measure(opened, rules)
    except UnsafeOutputPathError as error:  # a damaged index line naming a file outside OUT
        check.error = error.message
        return check
    except FileNotFoundError:
        check.error = "missing: the file is gone (`squeeze gen` on the run makes it again)"
        return check
    except UnidentifiedImageError:  # its message names the file object ("<_io.BufferedReader name=3>")
        check.error = f"cannot be read: not an image (PIL cannot identify it); {REMAKE}"
        return check
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        check.error = f"cannot be read: {getattr(error, 'strerror', None) or error}; {REMAKE}"
        return check
    check.failed = broken_rules(check.measured, rules)
    return check


def check_run(
    out_dir: str | os.PathLike,
    rules: RuleSet,
    variant: str | None = None,
    plan: RunPlan | None = None,
) -> CheckReport:
    """Every finished image in `OUT/index.jsonl` against `rules`: its PNG master, or with `variant` that
    channel variant (an image without one fails: `missing`). With the run's `plan`, only the plan's
    images (a stale one, of a product since dropped from the feed, is not published), and its manifest's
    variants are known before any image has them (`gen` makes them after the images).

    Raises:
        `RulesError`: `out_dir` has no run index.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise RulesError(*not_a_run_folder(out))
    if not (out / INDEX_NAME).is_file():
        raise RulesError(
            f"{out} has no {INDEX_NAME}: it is not the output folder of a finished `squeeze gen` run",
            run_folder_hint(
                out,
                "give the folder `squeeze gen` wrote"
                " (after a --shard run, `squeeze status OUT --merge` first)",
            ),
        )
    planned = {job.job_id for job in plan.jobs} if plan is not None else None
    declared = {v.name for v in plan.loaded.document.output.variants} if plan is not None else set()
    lines = sorted(_finished_lines(read_index(out), planned), key=lambda line: str(line.get("image")))
    known = variant is None or variant in declared or any(_variant_of(line, variant) for line in lines)
    if lines and not known:
        made = sorted(declared | {name for line in lines for name in _variants(line)})
        raise RulesError(
            f"no image in {out} has a variant {variant!r}",
            f"its variants: {', '.join(made)}" if made else "the run made none (`output.variants`)",
        )
    checks = [check_job_image(out, line["image"], line.get(VARIANTS_KEY), rules, variant) for line in lines]
    return CheckReport(rules, variant, checks)


def _variants(line: Mapping[str, Any]) -> Mapping[str, Any]:
    variants = line.get(VARIANTS_KEY)
    return variants if isinstance(variants, Mapping) else {}


def _variant_of(line: Mapping[str, Any], variant: str) -> bool:
    return isinstance(_variants(line).get(variant), str)


def check_job_image(
    out_dir: Path, image: str, variants: Any, rules: RuleSet, variant: str | None = None
) -> ImageCheck:
    """A finished job's PNG master (`image`, relative to `out_dir`), or with `variant` that channel variant
    of it, from the job's `variants` record (`{name: file}`); a job without that variant fails: `missing`."""
    if variant is None:
        return check_file(out_dir, image, rules)
    file = variants.get(variant) if isinstance(variants, Mapping) else None
    if isinstance(file, str):
        return check_file(out_dir, file, rules)
    return ImageCheck(image, error=f"missing: it has no variant {variant!r}")


def _finished_lines(
    lines: Sequence[Mapping[str, Any]], planned: Collection[str] | None
) -> list[Mapping[str, Any]]:
    return [
        line
        for line in lines
        if line.get("status") == "ok"
        and isinstance(line.get("image"), str)
        and (planned is None or line.get("job_id") in planned)
    ]


def format_report(report: CheckReport) -> str:
    """The text `squeeze check` prints: one line per image, then the counts."""
    lines = []
    for check in report.images:
        verdict = "pass" if check.passed else "FAIL"
        numbers = check.error or ", ".join(
            _describe(key, value, report.rules) for key, value in check.measured.items()
        )
        broken = f"  (breaks {', '.join(check.failed)})" if check.failed else ""
        lines.append(f"{verdict}  {check.image}: {numbers}{broken}")
    passed = len(report.images) - report.failed
    lines.append(checks_counts_line(report.rules.name, report.variant, passed, report.failed))
    return "\n".join(lines)


def checks_counts_line(rules: str, variant: str | None, passed: int, failed: int) -> str:
    """`amazon-main on the masters: 4 passed, 2 failed`."""
    what = f"variant {variant!r}" if variant else "the masters"
    return f"{rules} on {what}: {passed} passed, {failed} failed"


def _describe(key: str, value: float | int, rules: RuleSet) -> str:
    if key == "longest_side":
        limit = f" (≥ {rules.min_longest_side})" if rules.min_longest_side is not None else ""
        return f"longest side {value} px{limit}"
    if key == "border_background":
        return f"border {value:.1%} background (≥ {rules.border_background:.0%})"
    return f"fill {value:.1%} (≥ {rules.min_fill:.0%})"
