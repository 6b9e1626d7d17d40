"""The training config (`squeeze train CONFIG.yaml`): schema, packaged presets, located all-at-once checks.

Torch-free, like the manifest: a config with problems is refused before any model or data is touched, and
every problem is reported at once, located by file, line, column and field (``stages.stage1.steps``).
The YAML loading and pydantic-error translation are the manifest's own (`load_yaml`, `validate_schema`).
"""

from __future__ import annotations

import importlib.resources
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from squeeze_cli.errors import ManifestError, Problem, RecipeError
from squeeze_cli.images import check_image, image_hint
from squeeze_cli.manifest.located import (
    FieldPath,
    Location,
    YamlDocument,
    apply_overrides,
    load_yaml,
    read_manifest_text,
    sort_problems,
)
from squeeze_cli.manifest.recipes import COMMAND_LINE_PATHS_HINT, load_recipe, on_command_line, path_base
from squeeze_cli.manifest.schema import SeedInt, SideInt, StrictModel, Thresholds, non_empty
from squeeze_cli.manifest.schema_errors import schema_error, validate_schema
from squeeze_cli.params import DEFAULT_NUM_INFERENCE_STEPS, PAPER_GUIDANCE_SCALE, PAPER_STAGE_THRESHOLDS

CONFIG_VERSION = 1
PRESET_SUFFIX = ".yaml"
# FLUX attention projections: the double blocks' image (to_*) and text (add_*) streams, and the single
# blocks' to_q/k/v (their to_out is the fused proj_out, outside attention). Rank 512 on these is 0.84 B.
FLUX_ATTENTION_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


def _positive(value: int) -> int:
    if value < 1:
        raise schema_error(f"must be at least 1, got {value}")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise schema_error(f"must be 0 or more, got {value}")
    return value


def _probability(value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise schema_error(f"must be a probability in [0, 1], got {value}")
    return float(value)


def _learning_rate(value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise schema_error(
            f"must be a learning rate in [0, 1], got {value}", "LoRA and new modules use about 1e-4"
        )
    return float(value)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise schema_error(f"must be a finite number, got {value}")
    return float(value)


PositiveInt = Annotated[StrictInt, AfterValidator(_positive)]
NonNegativeInt = Annotated[StrictInt, AfterValidator(_non_negative)]
Probability = Annotated[StrictFloat | StrictInt, AfterValidator(_probability)]
LearningRate = Annotated[StrictFloat | StrictInt, AfterValidator(_learning_rate)]
FiniteFloat = Annotated[StrictFloat | StrictInt, AfterValidator(_finite)]
NonEmptyStr = Annotated[StrictStr, AfterValidator(non_empty)]
Group = Literal["aggregator", "lora"]  # what a stage can train; the MLLM and the VAE never are


# Data ------------------------------------------------------------------------------------------------


class JsonlData(StrictModel):
    """Samples ``{"references": [...], "instruction": "...", "target": "..."}``, one JSON object a line
    (or a folder of ``*.json`` files with the same keys); image paths are relative to the file."""

    format: Literal["jsonl"]
    path: NonEmptyStr


class HfColumns(StrictModel):
    """Which column holds what, for `format: hf` with `layout: columns`."""

    references: NonEmptyStr = "references"
    instruction: NonEmptyStr = "instruction"
    target: NonEmptyStr = "target"
    id: NonEmptyStr | None = None


class Subjects200kFilter(StrictModel):
    """Quality filter of `Yuanshi/Subjects200K` rows: every score in `quality_assessment` (1-5) must reach
    `min_quality` (OminiControl trains on rows with all scores at 5)."""

    min_quality: Annotated[StrictInt, Field(ge=0, le=5)] = 5


class HfData(StrictModel):
    """A Hugging Face dataset through `datasets`: a hub id, a local dataset folder, or parquet file(s)."""

    format: Literal["hf"]
    path: NonEmptyStr
    split: NonEmptyStr = "train"
    revision: StrictStr | None = None
    # `columns`: one row = references (images or a list of them), an instruction, a target image.
    # `subjects200k`: one row = a 1024×512 image of the same subject twice (left | right), with
    # `description` and `quality_assessment`; one half is the reference, the other the target.
    layout: Literal["columns", "subjects200k"] = "columns"
    columns: HfColumns = Field(default_factory=HfColumns)
    filter: Subjects200kFilter = Field(default_factory=Subjects200kFilter)
    padding: NonNegativeInt = 8  # `subjects200k`: pixels around each half (8 in the real dataset)
    limit: PositiveInt | None = None


DataSpec = Annotated[JsonlData | HfData, Field(discriminator="format")]


# Model -----------------------------------------------------------------------------------------------


class AggregatorSpec(StrictModel):
    """The architecture of the DLA trained from scratch (its input and output sizes come from the MLLM and
    transformer configs). Defaults: the paper-sized DLA, 78 M parameters for InternVL3-8B -> FLUX."""

    width: PositiveInt = 1024
    num_heads: PositiveInt = 8
    num_blocks: PositiveInt = 2
    layers: list[StrictInt] | None = None
    single_lap: StrictBool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> AggregatorSpec:
        if self.width % self.num_heads:
            raise schema_error(f"`width` ({self.width}) must be divisible by `num_heads` ({self.num_heads})")
        return self


class LoraTrainSpec(StrictModel):
    rank: PositiveInt = 512
    alpha: FiniteFloat | None = None  # None: alpha = rank (scale 1)
    targets: Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        default_factory=lambda: list(FLUX_ATTENTION_TARGETS)
    )
    # Also the single blocks' fused output projection `proj_out` (as UNO's rank-512 LoRA); not the
    # transformer's own final `proj_out`, which a `proj_out` target would take too.
    single_blocks_proj_out: StrictBool = False
    dropout: Probability = 0.0


# Stages and optimisation -----------------------------------------------------------------------------


def _default_train() -> list[Group]:
    return ["aggregator", "lora"]


def _default_learning_rates() -> dict[Group, float | int]:
    return {"aggregator": 1e-4, "lora": 1e-4}


class StageSpec(StrictModel):
    steps: NonNegativeInt
    train: Annotated[list[Group], Field(min_length=1)] = Field(default_factory=_default_train)
    learning_rates: dict[Group, LearningRate] = Field(default_factory=_default_learning_rates)
    warmup_steps: NonNegativeInt = 0

    @model_validator(mode="after")
    def _rates_for_trained_groups(self) -> StageSpec:
        missing = [group for group in self.train if group not in self.learning_rates]
        if missing:
            raise schema_error(
                f"no learning rate for trained group(s) {', '.join(missing)}",
                f"add `learning_rates: {{{missing[0]}: 1.0e-4}}`",
            )
        if len(set(self.train)) != len(self.train):
            raise schema_error("`train` lists a group twice")
        return self


class Stages(StrictModel):
    """Stage 1: MLLM condition only (no reference tokens). Stage 2: continues from stage 1 with the
    references' VAE tokens added to the image stream."""

    stage1: StageSpec
    stage2: StageSpec


class DropoutSpec(StrictModel):
    """Condition dropout, drawn once per sample: with `both`, the MLLM condition becomes the pipeline's null
    condition and the reference tokens are left out; with `text` only the former; with `references` only
    the latter (stage 2; stage 1 has no reference tokens)."""

    text: Probability = 0.1
    references: Probability = 0.1
    both: Probability = 0.05

    @model_validator(mode="after")
    def _sum(self) -> DropoutSpec:
        if self.text + self.references + self.both > 1.0:
            raise schema_error("`text` + `references` + `both` must be at most 1")
        return self


class TimestepSpec(StrictModel):
    """σ = shift(sigmoid(n)), n ~ Normal(logit_mean, logit_std): logit-normal timesteps, then FLUX's
    resolution-dependent shift (`resolution_shift: true`) with μ from the target's token count."""

    logit_mean: FiniteFloat = 0.0
    logit_std: Annotated[StrictFloat | StrictInt, AfterValidator(_finite), Field(gt=0)] = 1.0
    resolution_shift: StrictBool = True


class OptimizerSpec(StrictModel):
    weight_decay: Annotated[StrictFloat | StrictInt, Field(ge=0)] = 1e-4
    beta1: Probability = 0.9
    beta2: Probability = 0.999
    eps: Annotated[StrictFloat | StrictInt, Field(gt=0)] = 1e-8
    max_grad_norm: Annotated[StrictFloat | StrictInt, Field(gt=0)] | None = 1.0


class TrainingSpec(StrictModel):
    batch_size: PositiveInt = 1  # per process
    gradient_accumulation_steps: PositiveInt = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: StrictBool = False
    guidance: FiniteFloat = 1.0  # FLUX-dev's distilled-guidance input during training
    buckets: Annotated[list[tuple[SideInt, SideInt]], Field(min_length=1)] = Field(
        default_factory=lambda: [(512, 512)]
    )
    reference_size: SideInt = 512
    timesteps: TimestepSpec = Field(default_factory=TimestepSpec)
    dropout: DropoutSpec = Field(default_factory=DropoutSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    cache_latents: StrictBool = False


class CheckpointSpec(StrictModel):
    every: PositiveInt = 1000
    keep: PositiveInt = 3


class ValidationPrompt(StrictModel):
    references: Annotated[list[NonEmptyStr], Field(min_length=1)]
    instruction: NonEmptyStr


class ValidationSpec(StrictModel):
    every: NonNegativeInt = 0  # 0: only at the end of each stage
    steps: PositiveInt = DEFAULT_NUM_INFERENCE_STEPS
    size: tuple[SideInt, SideInt] = (512, 512)
    seed: SeedInt = 0  # a torch generator's seed, as gen's
    guidance_scale: FiniteFloat = PAPER_GUIDANCE_SCALE
    stage_thresholds: Thresholds = PAPER_STAGE_THRESHOLDS
    prompts: list[ValidationPrompt] = Field(default_factory=list)


class LoggingSpec(StrictModel):
    every: PositiveInt = 10
    tensorboard: StrictBool = True  # when tensorboard is installed


class TrainConfig(StrictModel):
    """The training config file."""

    version: Literal[1]
    recipe: NonEmptyStr
    output_dir: NonEmptyStr
    seed: SeedInt = 0  # torch takes seeds below 2**64; the run adds 1 and 2 for the LoRA and the DLA
    data: DataSpec
    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec)
    lora: LoraTrainSpec = Field(default_factory=LoraTrainSpec)
    stages: Stages
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _some_steps(self) -> TrainConfig:
        if self.stages.stage1.steps + self.stages.stage2.steps == 0:
            raise schema_error("both stages have 0 steps: nothing to train")
        return self


# Loading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with its paths made absolute (relative ones are taken from the config's folder, or
    from the current folder when `--set` gave them)."""

    path: Path  # the config file, or the packaged preset's file
    config: TrainConfig
    text: str  # as written
    document: YamlDocument  # for locating problems found later (data rows are located in their own file)
    output_dir: Path
    data_path: str  # absolute for local data; a hub id as given
    validation_references: tuple[tuple[Path, ...], ...]
    recipe_base: Path  # where a recipe path is taken from

    def locate(self, *path: str | int) -> Location:
        return self.document.locate(tuple(path))

    def error(self, path: tuple[str | int, ...], message: str, hint: str | None = None) -> ManifestError:
        """A problem found after validation (when the models are built), located at `path` of the config."""
        return ManifestError([self.document.problem(path, message, hint)])


def presets() -> dict[str, Any]:
    """The packaged training presets by name (``squeeze_cli/train/presets/*.yaml``)."""
    folder = importlib.resources.files("squeeze_cli.train.presets")
    return {
        entry.name[: -len(PRESET_SUFFIX)]: entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(PRESET_SUFFIX)
    }


def user_path(text: str) -> Path:
    """`text` as a path with `~` expanded; `ValueError` saying why it cannot be one (a NUL, an unknown
    user), which `Path` would raise as a traceback."""
    if "\0" in text:
        raise ValueError(f"the path {text!r} contains a NUL character")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # `~name` of no user on this machine
        raise ValueError(
            f"the path {text!r} starts with {text.split('/')[0]}, which is no user here"
        ) from None


def _is_local(value: str, base: Path) -> bool:
    return value.startswith(("./", "../", "/", "~")) or ("\0" not in value and (base / value).exists())


def _recipe_problems(document: YamlDocument, recipe: str, base: Path, relative_hint: str) -> list[Problem]:
    """The recipe must load (torch-free): an unknown name or a broken file is reported with the config's."""
    try:
        load_recipe(recipe, relative_to=base, relative_hint=relative_hint)
    except RecipeError as error:
        return [document.problem(("recipe",), error.message, error.hint)]
    except ManifestError as error:
        return list(error.problems)
    return []


def load_config(
    path_or_preset: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedConfig:
    """Read and validate a training config (a file, or a packaged preset's name such as ``tiny``).

    Relative paths in a file (data, output_dir, validation references, a recipe file) are taken from the
    file's folder; in a packaged preset, from the current directory, except its own example data; given
    by ``--set``, from the current directory.

    Raises:
        `ManifestError`: every problem found, each located in the file (or at the ``--set`` flag).
    """
    name = str(path_or_preset)
    packaged = presets()
    if name in packaged and not Path(name).exists():
        entry = packaged[name]
        text = entry.read_text(encoding="utf-8")
        file = f"squeeze_cli/train/presets/{entry.name}"
        config_path = Path(str(entry))
        base = Path.cwd()
        data_base = config_path.parent
    else:
        try:
            config_path = user_path(name).absolute()
        except ValueError as error:
            raise ManifestError([Problem(name, None, None, "", str(error))]) from None
        file = name
        text = read_manifest_text(
            config_path,
            file,
            "training config",
            f"give a training config's .yaml file, or a packaged preset: {', '.join(sorted(packaged))}",
        )
        base = data_base = config_path.parent

    document = load_yaml(text, file)
    problems = list(document.problems)
    if document.data is None:
        raise ManifestError(problems)
    problems += apply_overrides(document, list(overrides))
    if not isinstance(document.data, dict):
        raise ManifestError([*problems, document.problem((), "a training config is a mapping of keys")])
    config, schema_problems = validate_schema(TrainConfig, document)
    problems += schema_problems
    if config is None:
        raise ManifestError(sort_problems(problems))

    # A path that `--set` gave starts from the current folder; one in the file, from the file's folder.
    def start(path: FieldPath, file_base: Path) -> Path:
        return path_base(document, path, file_base)

    def relative_hint(path: FieldPath) -> str:
        if on_command_line(document.locate(path)):
            return COMMAND_LINE_PATHS_HINT
        return "paths are relative to the config's folder"

    def resolve(where: FieldPath, file_base: Path, text: str) -> Path | None:
        try:
            return (start(where, file_base) / user_path(text)).resolve()
        except ValueError as error:
            problems.append(document.problem(where, str(error)))
            return None

    output_dir = resolve(("output_dir",), base, config.output_dir)
    data_path = config.data.path
    data_start = start(("data", "path"), data_base)
    if _is_local(data_path, data_start):
        resolved_data = resolve(("data", "path"), data_base, data_path)
        data_path = str(resolved_data)
        if resolved_data is not None and not resolved_data.exists():
            problems.append(
                document.problem(
                    ("data", "path"), f"no such file or folder: {data_path}", relative_hint(("data", "path"))
                )
            )
    elif config.data.format == "jsonl":
        problems.append(
            document.problem(("data", "path"), f"no such file: {data_path}", "give the path of a .jsonl file")
        )
    references = []
    for index, prompt in enumerate(config.validation.prompts):
        resolved = []
        for number, reference in enumerate(prompt.references):
            where = ("validation", "prompts", index, "references", number)
            reference_path = resolve(where, data_base, reference)
            if reference_path is None:
                continue
            if not reference_path.exists():
                problems.append(
                    document.problem(where, f"no such image: {reference_path}", relative_hint(where))
                )
            elif (reason := check_image(str(reference_path))) is not None:  # as gen checks references
                problems.append(document.problem(where, f"{reference_path}: {reason}", image_hint(reason)))
            resolved.append(reference_path)
        references.append(tuple(resolved))
    recipe_base = start(("recipe",), base)
    problems += _recipe_problems(document, config.recipe, recipe_base, relative_hint(("recipe",)))
    if output_dir is not None and output_dir.exists() and not output_dir.is_dir():
        problems.append(document.problem(("output_dir",), f"{output_dir} exists and is not a folder"))
    if problems or output_dir is None:  # a path that cannot be resolved is one of the problems
        raise ManifestError(sort_problems(problems))
    return LoadedConfig(
        path=config_path,
        config=config,
        text=text,
        document=document,
        output_dir=output_dir,
        data_path=data_path,
        validation_references=tuple(references),
        recipe_base=recipe_base,
    )


__all__ = [
    "CONFIG_VERSION",
    "FLUX_ATTENTION_TARGETS",
    "LoadedConfig",
    "TrainConfig",
    "load_config",
    "presets",
]
