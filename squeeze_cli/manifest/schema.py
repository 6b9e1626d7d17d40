"""The manifest's schema (pydantic v2, unknown keys rejected): what a user may write, checked field by field.

Checks that need more than one field (recipes, references, placeholders, limits) are in `resolve`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from squeeze_cli.manifest.schema_errors import schema_error
from squeeze_cli.params import (
    DEFAULT_STEP_CACHE_THRESHOLD,
    DEFAULT_TAYLORSEER_INTERVAL,
    DEFAULT_TAYLORSEER_ORDER,
    DEFAULT_TAYLORSEER_WARMUP_STEPS,
    FAMILY_ADAPTERS,
    PAPER_STAGE_THRESHOLDS,
    SAMPLING_KEYS,
    STEP_CACHE_FIELDS,
    Dtype,
    StepCache,
    StepCacheMethod,
)
from squeeze_cli.pipelines.registry import DEFAULT_PIPELINE, PIPELINES

# Literal types built from the tables at run time, so that pydantic checks the value and lists the
# choices; a static type checker cannot evaluate them and sees plain `str`.
if TYPE_CHECKING:
    PipelineName: TypeAlias = str
    FamilyName: TypeAlias = str
    DtypeName: TypeAlias = str
else:
    PipelineName = Literal[tuple(PIPELINES)]
    FamilyName = Literal[tuple(FAMILY_ADAPTERS)]
    DtypeName = Literal[tuple(Dtype.__members__)]

MANIFEST_VERSION = 1
# Plans above this many jobs are refused unless raised with `--max-jobs` or `max_jobs:`; it catches a
# typo like `count: 1000000` before it turns into a week of GPU time.
DEFAULT_MAX_JOBS = 100_000
PAPER_THRESHOLDS_HINT = f"the paper uses {list(PAPER_STAGE_THRESHOLDS)}"
MAX_SEED = 2**63 - 1
MAX_SIDE = 8192  # of a generated image


SUBJECT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# What squeeze writes at the top of the output folder beside the subjects' folders (outputs/layout.py's
# RESERVED_NAMES, which a test keeps equal): no subject may take one of these names, in any case.
RESERVED_SUBJECT_NAMES = frozenset(
    {"index.jsonl", "run.json", "manifest.resolved.yaml", "shards"}
    | {"metrics.jsonl", "metrics.json", "metrics-cache.json", "report.html"}
)
PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

ComponentName = Literal[
    "mllm", "tokenizer", "image_processor", "aggregator", "transformer", "vae", "scheduler"
]
COMPONENT_NAMES: tuple[ComponentName, ...] = get_args(ComponentName)
# Without a full pipeline folder these must be named one by one; tokenizer and image_processor
# default to the mllm's source.
REQUIRED_COMPONENTS = ("mllm", "aggregator", "transformer", "vae", "scheduler")


# Schema ----------------------------------------------------------------------------------------------


def _multiple_of_16(value: int) -> int:
    if not 16 <= value <= MAX_SIDE or value % 16:
        nearest = min(max(16, round(value / 16) * 16), MAX_SIDE)
        raise schema_error(
            f"must be a multiple of 16 between 16 and {MAX_SIDE}, got {value}", f"use {nearest}"
        )
    return value


def _steps(value: int) -> int:
    if not 1 <= value <= 1000:
        raise schema_error(f"must be between 1 and 1000, got {value}")
    return value


def _finite_number(minimum: float, hint: str | None = None) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not math.isfinite(value) or value < minimum:
            raise schema_error(f"must be a number ≥ {minimum:g}, got {value}", hint)
        return float(value)

    return check


def _thresholds(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise schema_error("must be a list of two numbers [τ1, τ2]", PAPER_THRESHOLDS_HINT)
    return value


def _thresholds_order(value: tuple[float, float]) -> tuple[float, float]:
    high, low = value
    if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in value):
        raise schema_error(f"both thresholds must be in [0, 1], got [{high}, {low}]", PAPER_THRESHOLDS_HINT)
    if high < low:
        raise schema_error(f"τ1 must be ≥ τ2, got [{high}, {low}]", f"swap them: [{low}, {high}]")
    return (float(high), float(low))


def _seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise schema_error(f"seeds must be integers in [0, 2**63 - 1], got {value}")
    return value


def _unique_seeds(value: list[int]) -> list[int]:
    if not value:
        raise schema_error("must list at least one seed")
    seen: set[int] = set()
    for seed in value:
        if seed in seen:
            raise schema_error(
                f"seed {seed} appears more than once", "each seed gives one image: list it once"
            )
        seen.add(seed)
    return value


StepsInt = Annotated[StrictInt, AfterValidator(_steps)]
SideInt = Annotated[StrictInt, AfterValidator(_multiple_of_16)]
NonNegativeFloat = Annotated[float, Field(strict=True), AfterValidator(_finite_number(0.0))]
TrueCfg = Annotated[float, Field(strict=True), AfterValidator(_finite_number(1.0, "1.0 turns true CFG off"))]
Thresholds = Annotated[
    tuple[Annotated[float, Field(strict=True)], Annotated[float, Field(strict=True)]],
    BeforeValidator(_thresholds),
    AfterValidator(_thresholds_order),
]
SeedInt = Annotated[StrictInt, AfterValidator(_seed)]


# Sampling keys that take a list of values, one job per value (a sweep, as A1111's X/Y/Z plot). A sweep of
# `stage_thresholds`, itself a pair, is a list of pairs.
SWEPT_KEYS = ("num_inference_steps", "guidance_scale", "true_cfg_scale", "stage_thresholds")


def _unique_values(values: list[Any]) -> list[Any]:
    for place, value in enumerate(values):
        if value in values[:place]:
            raise schema_error(
                f"{list(value) if isinstance(value, tuple) else value} appears more than once in the sweep",
                "each value makes its own images: list it once",
            )
    return values


def _sweepable(one: Any, *, pair: bool = False) -> Any:
    """`one` value, or a sweep: a list of such values, at least one, each once (errors at `key[i]`)."""

    def kind(value: Any) -> str:
        if not isinstance(value, list):
            return "one"
        # A pair (stage_thresholds) is itself a list: only a list of lists sweeps it.
        return "sweep" if not pair or any(isinstance(item, list) for item in value) else "one"

    sweep = Annotated[list[one], Field(min_length=1), AfterValidator(_unique_values)]
    return Annotated[Annotated[one, Tag("one")] | Annotated[sweep, Tag("sweep")], Discriminator(kind)]


# Built at run time for pydantic; a static type checker sees the plain value or its list.
if TYPE_CHECKING:
    SweptSteps: TypeAlias = int | list[int]
    SweptFloat: TypeAlias = float | list[float]
    SweptThresholds: TypeAlias = tuple[float, float] | list[tuple[float, float]]
    SweptTrueCfg: TypeAlias = float | list[float]
else:
    SweptSteps = _sweepable(StepsInt)
    SweptFloat = _sweepable(NonNegativeFloat)
    SweptThresholds = _sweepable(Thresholds, pair=True)
    SweptTrueCfg = _sweepable(TrueCfg)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SeedRange(StrictModel):
    """``{count: N, base: B}``: the seeds B, B+1, ..., B+N-1."""

    count: StrictInt
    base: SeedInt = 0

    @model_validator(mode="after")
    def _check(self) -> SeedRange:
        if self.count < 1:
            raise schema_error(f"`count` must be at least 1, got {self.count}")
        if self.base + self.count - 1 > MAX_SEED:
            raise schema_error("the last seed (base + count - 1) is above 2**63 - 1")
        return self

    def seeds(self) -> range:
        return range(self.base, self.base + self.count)


def _seeds_kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "range"
    return None


SeedList = Annotated[list[SeedInt], AfterValidator(_unique_seeds)]
Seeds = Annotated[
    Annotated[SeedList, Tag("list")] | Annotated[SeedRange, Tag("range")],
    Discriminator(_seeds_kind, custom_error_type="seeds_shape", custom_error_message="bad seeds"),
]


def _positive_threshold(value: float) -> float:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise schema_error(
            f"must be a number in (0, 1), got {value}",
            f"try {DEFAULT_STEP_CACHE_THRESHOLD}; higher is faster and further from exact sampling",
        )
    return value


class StepCacheSpec(StrictModel):
    """``step_cache: {method: first_block, threshold: 0.08}`` or ``{method: taylorseer, interval: 5}``:
    diffusers' step caching (changes pixels). Each method takes its own keys (`STEP_CACHE_FIELDS`)."""

    method: StepCacheMethod = StepCacheMethod.first_block
    threshold: Annotated[float, Field(strict=True), AfterValidator(_positive_threshold)] = (
        DEFAULT_STEP_CACHE_THRESHOLD
    )
    interval: Annotated[StrictInt, Field(ge=2, le=1000)] = DEFAULT_TAYLORSEER_INTERVAL
    # At least one full pass per stage before the first forecast: there is nothing to forecast from.
    warmup_steps: Annotated[StrictInt, Field(ge=1, le=1000)] = DEFAULT_TAYLORSEER_WARMUP_STEPS
    order: Annotated[StrictInt, Field(ge=0, le=4)] = DEFAULT_TAYLORSEER_ORDER
    # A target instead of a threshold: the share of transformer passes to skip (first_block).
    skip: Annotated[float, Field(strict=True, gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _keys_of_the_method(self) -> StepCacheSpec:
        own = STEP_CACHE_FIELDS[self.method.value]
        others = sorted(self.model_fields_set - {"method", *own})
        if others:
            raise schema_error(
                f"`{others[0]}` is not a setting of method {self.method.value} (it takes {', '.join(own)})",
                f"remove `{others[0]}`, or set the method it belongs to",
            )
        if {"threshold", "skip"} <= self.model_fields_set:
            raise schema_error(
                "`threshold` and `skip` both set: `skip` calibrates the threshold",
                "keep one: `skip` (a share of passes to skip) or `threshold`",
            )
        return self

    def to_params(self) -> StepCache:
        return StepCache(
            method=self.method.value,
            threshold=float(self.threshold),
            interval=self.interval,
            warmup_steps=self.warmup_steps,
            order=self.order,
            skip=None if self.skip is None else float(self.skip),
        )


# Sampling keys whose `null` means something: no negative prompt, no step cache (exact sampling).
NULLABLE_SAMPLING_KEYS = ("negative_prompt", "step_cache")


class SamplingOverrides(StrictModel):
    """Sampling parameters, every one optional: a level of the merge sets only what it names."""

    # The keys in SWEPT_KEYS take a list of values too: one job per value.
    num_inference_steps: SweptSteps | None = None
    guidance_scale: SweptFloat | None = None
    height: SideInt | None = None
    width: SideInt | None = None
    stage_thresholds: SweptThresholds | None = None
    keep_mllm_condition: StrictBool | None = None
    true_cfg_scale: SweptTrueCfg | None = None
    negative_prompt: StrictStr | None = None
    reference_size: SideInt | None = None
    step_cache: StepCacheSpec | None = None
    seeds: Seeds | None = None
    # Keys for one pipeline only (`for_pipeline: {squeeze: {stage_thresholds: [0.95, 0.85]}}`): applied over
    # this level's own when the recipe runs that pipeline, skipped otherwise, so one manifest runs with every
    # recipe. Each block is checked against its own pipeline's keys.
    for_pipeline: dict[StrictStr, PipelineOverrides] | None = None

    @field_validator(
        *[key for key in SAMPLING_KEYS if key not in NULLABLE_SAMPLING_KEYS], "seeds", mode="before"
    )
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # `key: null` would silently mean "unset"; only the NULLABLE_SAMPLING_KEYS have a meaningful null.
        if value is None:
            raise schema_error("expected a value, got null", "remove the key to use the default")
        return value

    def explicit(self, pipeline: str | None = None) -> dict[str, Any]:
        """The sampling parameters this level sets (``seeds`` excluded), with its `for_pipeline` block for
        `pipeline` over them."""
        values = {key: getattr(self, key) for key in self.model_fields_set.intersection(SAMPLING_KEYS)}
        if isinstance(values.get("step_cache"), StepCacheSpec):
            values["step_cache"] = values["step_cache"].to_params()
        block = (self.for_pipeline or {}).get(pipeline) if pipeline is not None else None
        return {**values, **block.explicit()} if block is not None else values


class PipelineOverrides(SamplingOverrides):
    """A `for_pipeline` block: sampling keys only."""

    @field_validator("seeds", "for_pipeline", mode="before")
    @classmethod
    def _not_in_a_block(cls, value: Any, info: ValidationInfo) -> Any:
        raise schema_error(
            f"`{info.field_name}` cannot be set for one pipeline: a block holds sampling keys only",
            f"move `{info.field_name}` out of `for_pipeline`",
        )


SamplingOverrides.model_rebuild()


class PromptSpec(SamplingOverrides):
    """One prompt with its own overrides."""

    text: StrictStr


def _prompt_shape(value: Any) -> Any:
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, dict):
        raise schema_error("expected a prompt string or a mapping with `text`")
    return value


UNIQUE_NAMES_HINT = "subject names must be unique (ignoring case): they name the output folders"


def folder_name_problem(value: str) -> tuple[str, str] | None:
    """Why `value` cannot name a folder squeeze writes (a subject's, a variant's), with the fix; or None."""
    if not SUBJECT_NAME_PATTERN.match(value) or ".." in value:
        return (
            f"{value!r} is not usable as a folder name",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return None


def subject_name_problem(value: str) -> tuple[str, str] | None:
    """Why `value` cannot name a subject (its output folder), with the fix; None when it can."""
    if (problem := folder_name_problem(value)) is not None:
        return problem
    if value.casefold() in RESERVED_SUBJECT_NAMES:
        return (
            f"{value!r} cannot name a subject: squeeze writes its own {value.casefold()} beside the "
            "subjects' folders",
            f"choose another name (not one of {', '.join(sorted(RESERVED_SUBJECT_NAMES))})",
        )
    return None


def _folder_name(value: str) -> str:
    if (problem := folder_name_problem(value)) is not None:
        raise schema_error(*problem)
    return value


def _subject_name(value: str) -> str:
    if (problem := subject_name_problem(value)) is not None:
        raise schema_error(*problem)
    return value


def non_empty(value: str) -> str:
    if not value.strip():
        raise schema_error("must not be empty")
    return value


class Subject(SamplingOverrides):
    """One subject: its reference photos, its prompts, and overrides for all of its prompts."""

    name: Annotated[StrictStr, AfterValidator(_subject_name)]
    class_noun: Annotated[StrictStr, AfterValidator(non_empty)] | None = Field(None, alias="class")
    references: Annotated[list[StrictStr], Field(min_length=1)]
    prompts: Annotated[list[Annotated[PromptSpec, BeforeValidator(_prompt_shape)]], Field(min_length=1)]


# What a feed's cell holds several of (references, prompts) is split at this, in CSV files; JSONL and
# Parquet cells may be lists instead. `|` is rare in paths and prompts, and needs no quoting in CSV.
DEFAULT_FEED_SEPARATOR = "|"
FeedFormat = Literal["csv", "jsonl", "parquet"]
ColumnName = Annotated[StrictStr, AfterValidator(non_empty)]


class SubjectFeed(StrictModel):
    """``subjects_from``: one subject per row of a CSV, JSONL or Parquet file (a shop's product feed).

    The keys name the file's columns; `scenes` are the prompts every row gets (subjects x scenes), before
    the row's own prompts (the `prompts` column). Every column is a placeholder for prompt text.
    """

    path: Annotated[StrictStr, AfterValidator(non_empty)]
    format: FeedFormat | None = None  # unset: from the file's suffix
    name: ColumnName
    class_column: ColumnName | None = Field(None, alias="class")
    references: ColumnName
    prompts: ColumnName | None = None
    separator: Annotated[StrictStr, AfterValidator(non_empty)] = DEFAULT_FEED_SEPARATOR
    scenes: list[Annotated[PromptSpec, BeforeValidator(_prompt_shape)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_prompts(self) -> SubjectFeed:
        if not self.scenes and self.prompts is None:
            raise schema_error(
                "the rows get no prompts: set `scenes` (prompts every row gets) or `prompts` (a column)",
                "e.g. scenes: ['a {class} on a marble counter']",
            )
        return self


VARIANT_SIZE_PATTERN = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")
MAX_VARIANT_SIDE = 10_000  # of a channel variant: beyond any marketplace's largest
DEFAULT_VARIANT_QUALITY = 90  # JPEG and WebP
MetadataLevel = Literal["full", "minimal", "none"]


def _variant_size(value: str) -> str:
    match = VARIANT_SIZE_PATTERN.match(value)
    if match is None or not all(1 <= int(side) <= MAX_VARIANT_SIDE for side in match.groups()):
        raise schema_error(
            f"must be WIDTHxHEIGHT in pixels, each between 1 and {MAX_VARIANT_SIDE}, got {value!r}",
            "for example 2000x2000",
        )
    return value


# `output.views_dir`: one folder name starting with `.` or `_`, which no subject name can (a `.` or `__`
# folder is also one dataset loaders skip).
VIEWS_DIR_PATTERN = re.compile(r"^[._][A-Za-z0-9._-]{0,63}$")


def _views_dir(value: str) -> str:
    if not VIEWS_DIR_PATTERN.match(value) or value in {".", "..", ".stale"} or value.startswith(".squeeze"):
        raise schema_error(
            f"{value!r} is not a folder name for the views",
            "one name starting with `.` or `__`, e.g. `.views`: dataset loaders skip it",
        )
    return value


def _color(value: str) -> str:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError:
        raise schema_error(f"{value!r} is not a colour", "use a name (white) or #rrggbb") from None
    return value


class OutputVariant(StrictModel):
    """One channel copy of every finished image (`output.variants`), made from its PNG master."""

    name: Annotated[StrictStr, AfterValidator(_folder_name)]
    size: Annotated[StrictStr, AfterValidator(_variant_size)]
    fit: Literal["pad", "crop", "contain"] = "pad"
    background: Annotated[StrictStr, AfterValidator(_color)] = "#ffffff"
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: Annotated[StrictInt, Field(ge=1, le=100)] | None = None

    @model_validator(mode="after")
    def _quality_is_lossy(self) -> OutputVariant:
        if self.quality is not None and self.format == "png":
            raise schema_error("`quality` is for jpeg and webp: png is lossless", "remove `quality`")
        return self

    @property
    def box(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        width, height = self.size.split("x")
        return int(width), int(height)

    @property
    def encoder_quality(self) -> int | None:
        """The quality the encoder gets: the variant's, or the default for a lossy format."""
        return None if self.format == "png" else self.quality or DEFAULT_VARIANT_QUALITY


def _unique_variant_names(value: list[OutputVariant]) -> list[OutputVariant]:
    seen: set[str] = set()
    for variant in value:
        if variant.name.casefold() in seen:
            raise schema_error(
                f"variant name {variant.name!r} appears more than once",
                "variant names must be unique (ignoring case): they name the folders",
            )
        seen.add(variant.name.casefold())
    return value


class OutputSpec(StrictModel):
    dir: Annotated[StrictStr, AfterValidator(non_empty)] = "squeeze-out"
    grids: StrictBool = True
    contact_sheet: StrictBool = True
    # What the image files carry (the sidecar always has everything): see docs/outputs.md.
    metadata: MetadataLevel = "full"
    variants: Annotated[list[OutputVariant], AfterValidator(_unique_variant_names)] = Field(
        default_factory=list
    )
    # Grids and contact sheets in `OUT/<views_dir>/<subject>/`, so the subjects' folders hold only images.
    views_dir: Annotated[StrictStr, AfterValidator(_views_dir)] | None = None


def _output_shape(value: Any) -> Any:
    return {"dir": value} if isinstance(value, str) else value


class ComponentSource(StrictModel):
    """Where one component is loaded from: a hub id or a local folder, as ``from_pretrained`` takes it."""

    path: Annotated[StrictStr, AfterValidator(non_empty)]
    subfolder: StrictStr | None = None
    revision: StrictStr | None = None


class LoraSpec(StrictModel):
    path: Annotated[StrictStr, AfterValidator(non_empty)]
    weight_name: StrictStr | None = None
    scale: NonNegativeFloat = 1.0


# The MLLM preprocessing options of `model.mllm`, by the family that has them.
MLLM_OPTION_FAMILIES = {"crop_to_patches": "internvl", "max_pixels": "qwen2_5_vl"}


def _max_pixels(value: int) -> int:
    if value < 1:
        raise schema_error(f"must be a positive number of pixels, got {value}", "e.g. 200704 (448²)")
    return value


class MLLMOptions(StrictModel):
    """``model.mllm``: how the MLLM sees the references (changes the condition, so it is in job ids)."""

    # InternVL: dynamic tiling (448-px tiles + thumbnail, 256 tokens each) or one tile (256 tokens).
    crop_to_patches: StrictBool | None = None
    # Qwen2.5-VL: the most pixels an image is resized to (28×28 per token): 200704 = 448² → 256 tokens.
    max_pixels: Annotated[StrictInt, AfterValidator(_max_pixels)] | None = None

    def encoder_options(self) -> dict[str, Any]:
        """The `MLLMEncoder` keyword arguments these options set."""
        return self.model_dump(exclude_none=True)


class ModelSpec(StrictModel):
    """The model section of a recipe, after the manifest's `model:` overrides are merged in.

    Either `builtin: tiny` (random weights built on the fly), or `pipeline:` (a full SqueezePipeline
    folder or hub id, whose parts `components` may replace), or `components` naming every part.
    """

    builtin: Literal["tiny"] | None = None
    pipeline: Annotated[StrictStr, AfterValidator(non_empty)] | None = None
    # Which pipeline runs the model (squeeze_cli.pipelines.registry); unset means `squeeze`, and stays out
    # of `model_identity` so the squeeze pipeline's job ids do not change.
    pipeline_class: PipelineName | None = None
    family: FamilyName | None = None
    components: dict[ComponentName, ComponentSource] = Field(default_factory=dict)
    lora: LoraSpec | None = None
    mllm: MLLMOptions | None = None
    dtype: DtypeName = Dtype.bfloat16.value
    trust_remote_code: StrictBool = False
    # `torch.compile` of the transformer's repeated blocks after loading; float rounding only, so, like
    # `--batch-size`, it stays out of `model_identity` (docs/manifest.md).
    compile: StrictBool = False

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.pipeline_class == DEFAULT_PIPELINE:
            self.pipeline_class = None  # the default, spelled out: same model, same job ids
        if self.pipeline_class is not None:
            if self.components or self.family or self.mllm:
                key = "components" if self.components else "family" if self.family else "mllm"
                raise schema_error(
                    f"`{key}` applies to the squeeze pipeline only, not to "
                    f"`pipeline_class: {self.pipeline_class}`",
                    f"remove `{key}`; `pipeline:` names the whole checkpoint (hub id or folder)",
                )
            if not self.builtin and not self.pipeline:
                raise schema_error(
                    f"no model source for `pipeline_class: {self.pipeline_class}`",
                    "set `pipeline:` to its checkpoint (hub id or folder), or `builtin: tiny`",
                )
        if self.builtin and self.pipeline:
            raise schema_error("set either `builtin` or `pipeline`, not both")
        if self.mllm is not None and not self.mllm.encoder_options():
            self.mllm = None  # `mllm: {}` is the processors' own settings: same model, same job ids
        for option in self.mllm.encoder_options() if self.mllm else ():
            family = MLLM_OPTION_FAMILIES[option]
            if self.family != family:
                raise schema_error(
                    f"`mllm.{option}` is an option of the {family} family, but `family` is "
                    f"{self.family or 'not set'}",
                    f"set `family: {family}`" if self.family is None else f"remove `mllm.{option}`",
                )
        if self.builtin and self.components:
            raise schema_error(
                "`components` cannot be combined with `builtin`", "use `pipeline:` or components only"
            )
        if not self.builtin and not self.pipeline:
            missing = [name for name in REQUIRED_COMPONENTS if name not in self.components]
            if missing:
                raise schema_error(
                    f"no model source: `components` lacks {', '.join(missing)}",
                    "set `pipeline:` to a full SqueezePipeline folder, or name every component",
                )
        return self


class QualityGate(StrictModel):
    """The manifest's optional `quality:` section: the identity gate of `gen` (`squeeze_cli/gen/gate.py`)."""

    min_dino: float = Field(ge=-1.0, le=1.0, description="regenerate an image whose DINO is below this")
    max_attempts: int = Field(3, ge=1, le=20, description="images made per job at most, the first included")
    # `auto`: the tiny random metric models with the tiny preset (no download), the real ones otherwise.
    metrics: Literal["auto", "dreambench", "tiny"] = "auto"


class Manifest(StrictModel):
    """The manifest file as written (after ``--set`` overrides), before references are resolved."""

    version: StrictInt
    recipe: Annotated[StrictStr, AfterValidator(non_empty)] | None = None
    model: dict[StrictStr, Any] | None = None
    output: Annotated[OutputSpec, BeforeValidator(_output_shape)] = Field(default_factory=OutputSpec)
    max_jobs: StrictInt | None = None
    defaults: SamplingOverrides = Field(default_factory=SamplingOverrides)
    # Optional beside a feed; written, a list of at least one.
    subjects: Annotated[list[Subject], Field(min_length=1)] = Field(default_factory=list)
    subjects_from: SubjectFeed | None = None
    quality: QualityGate | None = None
    # Silences the warning about a recipe whose weights' licence does not allow commercial use.
    acknowledge_license: Literal["non-commercial"] | None = None

    @model_validator(mode="after")
    def _some_subjects(self) -> Manifest:
        if not self.subjects and self.subjects_from is None:
            raise schema_error(
                "missing required key `subjects` (or `subjects_from`, a feed of subjects)",
                "see docs/manifest.md",
            )
        return self

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value != MANIFEST_VERSION:
            raise schema_error(
                f"unsupported manifest version {value}", f"this squeeze reads `version: {MANIFEST_VERSION}`"
            )
        return value

    @field_validator("max_jobs")
    @classmethod
    def _check_max_jobs(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise schema_error(f"must be at least 1, got {value}")
        return value


class ManifestHead(Manifest):
    # Subjects are validated one by one (see `load_manifest`), so a broken subject cannot hide the others.
    subjects: Annotated[list[Any], Field(min_length=1)] = Field(default_factory=list)


# YAML with locations ---------------------------------------------------------------------------------
