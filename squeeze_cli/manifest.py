"""The manifest: its schema (pydantic v2, unknown keys rejected), YAML loading with line numbers, and the
checks that run before any model is loaded.

Every problem is collected and reported at once as a `ManifestError`, each located by file, line,
column and field path (``subjects[2].prompts[0].seeds``), so one `squeeze validate` run shows a user
everything to fix. Torch-free: this module runs on ``--help``-fast paths.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import re
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
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
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from squeeze_cli.errors import ManifestError, Problem, RecipeError
from squeeze_cli.plan import SamplingParams

if typing.TYPE_CHECKING:
    from squeeze_cli.recipes import Recipe

MANIFEST_VERSION = 1
# Plans above this many jobs are refused unless raised with `--max-jobs` or `max_jobs:`; it catches a
# typo like `count: 1000000` before it turns into a week of GPU time.
DEFAULT_MAX_JOBS = 100_000
MAX_SEED = 2**63 - 1
MAX_SIDE = 8192
# Reference images larger than this (in pixels) are refused from their header alone: a decompression
# bomb must not get as far as the decoder.
MAX_REFERENCE_PIXELS = 8192 * 8192
REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Anchors and aliases can expand a small file into a huge tree ("billion laughs"); stop walking early.
MAX_YAML_NODES = 2_000_000
# libyaml stops at 1000 levels; a manifest needs about 6, and deeper trees would exhaust Python's stack.
MAX_YAML_DEPTH = 100
SUBJECT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

SAMPLING_KEYS = tuple(SamplingParams.__dataclass_fields__)
COMPONENT_NAMES = ("mllm", "tokenizer", "image_processor", "aggregator", "transformer", "vae", "scheduler")
# Without a full pipeline folder these must be named one by one; tokenizer and image_processor
# default to the mllm's source.
REQUIRED_COMPONENTS = ("mllm", "aggregator", "transformer", "vae", "scheduler")

FieldPath = tuple[str | int, ...]


def format_field_path(path: Sequence[str | int]) -> str:
    """``("subjects", 2, "prompts", 0, "seeds")`` -> ``"subjects[2].prompts[0].seeds"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# Schema ----------------------------------------------------------------------------------------------


def _fail(message: str, hint: str | None = None) -> PydanticCustomError:
    # One error type for all our own checks; `_problem_from_error` reads message and hint back.
    return PydanticCustomError("squeeze", "{message}", {"message": message, "hint": hint})


def _multiple_of_16(value: int) -> int:
    if not 16 <= value <= MAX_SIDE or value % 16:
        nearest = min(max(16, round(value / 16) * 16), MAX_SIDE)
        raise _fail(f"must be a multiple of 16 between 16 and {MAX_SIDE}, got {value}", f"use {nearest}")
    return value


def _steps(value: int) -> int:
    if not 1 <= value <= 1000:
        raise _fail(f"must be between 1 and 1000, got {value}")
    return value


def _finite_number(minimum: float, hint: str | None = None) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not math.isfinite(value) or value < minimum:
            raise _fail(f"must be a number ≥ {minimum:g}, got {value}", hint)
        return float(value)

    return check


def _thresholds(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail("must be a list of two numbers [τ1, τ2]", "the paper uses [0.95, 0.85]")
    return value


def _thresholds_order(value: tuple[float, float]) -> tuple[float, float]:
    high, low = value
    if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in value):
        raise _fail(f"both thresholds must be in [0, 1], got [{high}, {low}]", "the paper uses [0.95, 0.85]")
    if high < low:
        raise _fail(f"τ1 must be ≥ τ2, got [{high}, {low}]", f"swap them: [{low}, {high}]")
    return (float(high), float(low))


def _seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise _fail(f"seeds must be integers in [0, 2**63 - 1], got {value}")
    return value


def _unique_seeds(value: list[int]) -> list[int]:
    if not value:
        raise _fail("must list at least one seed")
    seen: set[int] = set()
    for seed in value:
        if seed in seen:
            raise _fail(f"seed {seed} appears more than once", "each seed gives one image: list it once")
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


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SeedRange(_Schema):
    """``{count: N, base: B}``: the seeds B, B+1, ..., B+N-1."""

    count: StrictInt
    base: SeedInt = 0

    @model_validator(mode="after")
    def _check(self) -> SeedRange:
        if self.count < 1:
            raise _fail(f"`count` must be at least 1, got {self.count}")
        if self.base + self.count - 1 > MAX_SEED:
            raise _fail("the last seed (base + count - 1) is above 2**63 - 1")
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


class SamplingOverrides(_Schema):
    """Sampling parameters, every one optional: a level of the merge sets only what it names."""

    num_inference_steps: StepsInt | None = None
    guidance_scale: NonNegativeFloat | None = None
    height: SideInt | None = None
    width: SideInt | None = None
    stage_thresholds: Thresholds | None = None
    keep_mllm_condition: StrictBool | None = None
    true_cfg_scale: TrueCfg | None = None
    negative_prompt: StrictStr | None = None
    reference_size: SideInt | None = None
    seeds: Seeds | None = None

    @field_validator(*[key for key in SAMPLING_KEYS if key != "negative_prompt"], "seeds", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # `key: null` would silently mean "unset"; only negative_prompt has a meaningful null.
        if value is None:
            raise _fail("expected a value, got null", "remove the key to use the default")
        return value

    def explicit(self) -> dict[str, Any]:
        """The sampling parameters this level sets (``seeds`` excluded)."""
        return {key: getattr(self, key) for key in self.model_fields_set.intersection(SAMPLING_KEYS)}


class PromptSpec(SamplingOverrides):
    """One prompt with its own overrides."""

    text: StrictStr


def _prompt_shape(value: Any) -> Any:
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, dict):
        raise _fail("expected a prompt string or a mapping with `text`")
    return value


def _subject_name(value: str) -> str:
    if not SUBJECT_NAME_PATTERN.match(value) or ".." in value:
        raise _fail(
            f"{value!r} is not usable as a folder name",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise _fail("must not be empty")
    return value


class Subject(SamplingOverrides):
    """One subject: its reference photos, its prompts, and overrides for all of its prompts."""

    name: Annotated[StrictStr, AfterValidator(_subject_name)]
    class_noun: Annotated[StrictStr, AfterValidator(_non_empty)] | None = Field(None, alias="class")
    references: Annotated[list[StrictStr], Field(min_length=1)]
    prompts: Annotated[list[Annotated[PromptSpec, BeforeValidator(_prompt_shape)]], Field(min_length=1)]


class OutputSpec(_Schema):
    dir: Annotated[StrictStr, AfterValidator(_non_empty)] = "squeeze-out"
    grids: StrictBool = True
    contact_sheet: StrictBool = True


def _output_shape(value: Any) -> Any:
    return {"dir": value} if isinstance(value, str) else value


class ComponentSource(_Schema):
    """Where one component is loaded from: a hub id or a local folder, as ``from_pretrained`` takes it."""

    path: Annotated[StrictStr, AfterValidator(_non_empty)]
    subfolder: StrictStr | None = None
    revision: StrictStr | None = None


class LoraSpec(_Schema):
    path: Annotated[StrictStr, AfterValidator(_non_empty)]
    weight_name: StrictStr | None = None
    scale: NonNegativeFloat = 1.0


class ModelSpec(_Schema):
    """The model section of a recipe, after the manifest's `model:` overrides are merged in.

    Either `builtin: tiny` (random weights built on the fly), or `pipeline:` (a full SqueezePipeline
    folder or hub id, whose parts `components` may replace), or `components` naming every part.
    """

    builtin: Literal["tiny"] | None = None
    pipeline: Annotated[StrictStr, AfterValidator(_non_empty)] | None = None
    family: Literal["internvl", "qwen2_5_vl"] | None = None
    components: dict[Literal[COMPONENT_NAMES], ComponentSource] = Field(default_factory=dict)
    lora: LoraSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    trust_remote_code: StrictBool = False

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.builtin and self.pipeline:
            raise _fail("set either `builtin` or `pipeline`, not both")
        if self.builtin and self.components:
            raise _fail(
                "`components` cannot be combined with `builtin`", "use `pipeline:` or components only"
            )
        if not self.builtin and not self.pipeline:
            missing = [name for name in REQUIRED_COMPONENTS if name not in self.components]
            if missing:
                raise _fail(
                    f"no model source: `components` lacks {', '.join(missing)}",
                    "set `pipeline:` to a full SqueezePipeline folder, or name every component",
                )
        return self


class Manifest(_Schema):
    """The manifest file as written (after ``--set`` overrides), before references are resolved."""

    version: StrictInt
    recipe: Annotated[StrictStr, AfterValidator(_non_empty)] | None = None
    model: dict[StrictStr, Any] | None = None
    output: Annotated[OutputSpec, BeforeValidator(_output_shape)] = Field(default_factory=OutputSpec)
    max_jobs: StrictInt | None = None
    defaults: SamplingOverrides = Field(default_factory=SamplingOverrides)
    subjects: Annotated[list[Subject], Field(min_length=1)]

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value != MANIFEST_VERSION:
            raise _fail(
                f"unsupported manifest version {value}", f"this squeeze reads `version: {MANIFEST_VERSION}`"
            )
        return value

    @field_validator("max_jobs")
    @classmethod
    def _check_max_jobs(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise _fail(f"must be at least 1, got {value}")
        return value


class _ManifestHead(Manifest):
    # Subjects are validated one by one (see `load_manifest`), so a broken subject cannot hide the others.
    subjects: Annotated[list[Any], Field(min_length=1)]


# YAML with locations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    file: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based


@dataclass
class YamlDocument:
    """Parsed YAML plus where each node came from: ``marks`` for values, ``key_marks`` for keys."""

    data: Any
    file: str
    marks: dict[FieldPath, Location] = field(default_factory=dict)
    key_marks: dict[FieldPath, Location] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def locate(self, path: FieldPath, *, key: bool = False) -> Location:
        """The location of `path`, or of its nearest ancestor that has one."""
        if key and path in self.key_marks:
            return self.key_marks[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.marks:
                return self.marks[path[:end]]
        return Location(self.file)

    def problem(
        self, path: FieldPath, message: str, hint: str | None = None, *, key: bool = False
    ) -> Problem:
        where = self.locate(path, key=key)
        return Problem(where.file, where.line, where.column, format_field_path(path), message, hint)


def _location(file: str, mark: Any) -> Location:
    return Location(file, mark.line + 1, mark.column + 1) if mark is not None else Location(file)


def _problem_at(file: str, mark: Any, message: str, hint: str | None = None, field: str = "") -> Problem:
    """A problem at a YAML mark; with `mark` None, at the whole file."""
    where = _location(file, mark)
    return Problem(file, where.line, where.column, field, message, hint)


def load_yaml(text: str, file: str) -> YamlDocument:
    """Parse one YAML document safely (no Python tags), recording each node's line and column.

    Syntax errors, tabs, several documents, duplicate keys, Python or custom tags, recursive aliases and
    alias explosions become `Problem`s in the result.
    """
    document = YamlDocument(data=None, file=file)
    # libyaml's parser when present (10x faster on big manifests); the constructor is SafeConstructor
    # either way, so Python tags are refused.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            document.problems.append(
                _problem_at(
                    file,
                    None,
                    "the file is empty",
                    "a manifest needs at least `version: 1`, a `recipe` and a `subjects` list "
                    "(see docs/manifest.md)",
                )
            )
            return document
        # Count the values the aliases expand to before walking them: a "billion laughs" document is a
        # few lines that expand exponentially, and must be refused before anything expands it.
        try:
            size = _expanded_size(node, {}, set()) if _ALIAS_RE.search(text) else 0
        except _RecursiveAlias as recursive:
            document.problems.append(
                _problem_at(
                    file,
                    recursive.node.start_mark,
                    "an alias refers to itself or to a value that contains it",
                    "a manifest is a tree: copy the values instead of referring back",
                )
            )
            return document
        if size > MAX_YAML_NODES:
            document.problems.append(
                _problem_at(
                    file,
                    node.start_mark,
                    f"the document expands to too many nodes through aliases ({size:,} values, at most "
                    f"{MAX_YAML_NODES:,})",
                    "use fewer `*alias` references to large anchored values",
                )
            )
            return document
        # Walk the node tree before constructing: construction flattens `<<` merges into the mappings.
        _walk(node, (), document, on_stack=set(), depth=0)
        if _nested_too_deep(document):
            return document
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = " ".join(part for part in (error.context, error.problem) if part) or str(error)
        document.problems.append(_problem_at(file, mark, *_explain_yaml_error(message, text, mark)))
        return document
    except yaml.reader.ReaderError as error:  # a control character or NUL: located by character index
        line, column = _position(text, error.position)
        reason = error.reason.split(":")[0] if error.reason else "unacceptable character"
        character = f"#x{error.character:04x}" if isinstance(error.character, int) else repr(error.character)
        document.problems.append(
            Problem(
                file,
                line,
                column,
                "",
                f"{reason} {character}: YAML does not allow control characters",
                "remove it; is this a text file?",
            )
        )
        return document
    except yaml.YAMLError as error:
        document.problems.append(_problem_at(file, None, " ".join(str(error).split())))
        return document
    except RecursionError:
        document.problems.append(
            _problem_at(file, None, "the document is nested too deeply", "a manifest is flat")
        )
        return document
    finally:
        loader.dispose()
    document.data = data
    return document


def _position(text: str | bytes, index: int) -> tuple[int, int]:
    """1-based (line, column) of the character (or byte) at `index`."""
    newline = "\n" if isinstance(text, str) else b"\n"
    line_start = text.rfind(newline, 0, index) + 1
    return text.count(newline, 0, index) + 1, index - line_start + 1


def _explain_yaml_error(message: str, text: str, mark: Any) -> tuple[str, str | None]:
    """The parser's message on one line, with the fix for the mistakes people make most."""
    message = " ".join(message.split())
    tag = re.search(r"constructor for the tag '([^']*)'", message)
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (
            f"the YAML tag {shown} is not allowed",
            "a manifest holds plain values only (no Python objects or custom tags): remove the tag",
        )
    if _tab_at(text, mark):
        return message, "YAML indents with spaces, never tabs"
    if "expected a single document" in message:
        return message, "a manifest is one document: remove the `---` line and what follows, or merge them"
    return message, None


def _tab_at(text: str, mark: Any) -> bool:
    if mark is None:
        return False
    lines = text.splitlines()
    return mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]


# Where an alias can start (`key: *a`, `- *a`, `[*a, *b]`); a glob's `dir/*.jpg` cannot. Without a match the
# document has no alias and its size is simply its node count: the expansion pass is skipped.
_ALIAS_RE = re.compile(r"(?:^|[\s\[{,:?-])\*", re.MULTILINE)


class _RecursiveAlias(Exception):
    def __init__(self, node: Any):
        self.node = node


def _expanded_size(node: Any, sizes: dict[int, int], on_stack: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded; `_RecursiveAlias` if an alias
    refers back to a value that contains it.

    Shared (aliased) nodes are counted once per use but computed once, so this is linear in the file.
    """
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in on_stack:
        raise _RecursiveAlias(node)
    on_stack.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, on_stack)
        if total > MAX_YAML_NODES:
            break  # enough to refuse; no need to count further
    on_stack.discard(key)
    sizes[key] = total
    return total


def _nested_too_deep(document: YamlDocument) -> bool:
    return any(p.message.startswith("nested more than") for p in document.problems)


def _walk(node: Any, path: FieldPath, document: YamlDocument, on_stack: set[int], depth: int) -> None:
    if depth > MAX_YAML_DEPTH:
        if not _nested_too_deep(document):  # report the first one only
            document.problems.append(
                document.problem(path, f"nested more than {MAX_YAML_DEPTH} levels deep", "a manifest is flat")
            )
        return
    document.marks.setdefault(path, _location(document.file, node.start_mark))
    if id(node) in on_stack:  # a recursive alias: refused by `_expanded_size` already
        return
    on_stack.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), document, on_stack, depth + 1)
    elif isinstance(node, yaml.MappingNode):
        first_seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *base`: the merged keys count as this mapping's, but do not clash with it.
                for merged_key, merged_value in _merged_pairs(value_node):
                    key = _scalar_key(merged_key)
                    if key is not None:
                        document.key_marks.setdefault(
                            (*path, key), _location(document.file, merged_key.start_mark)
                        )
                        _walk(merged_value, (*path, key), document, on_stack, depth + 1)
                continue
            key = _scalar_key(key_node)
            if key is None:
                continue
            if key in first_seen:
                first = first_seen[key].start_mark.line + 1
                document.problems.append(
                    _problem_at(
                        document.file,
                        key_node.start_mark,
                        f"duplicate key `{key}` (first set on line {first})",
                        "keep only one of them",
                        field=format_field_path((*path, key)),
                    )
                )
                continue
            first_seen[key] = key_node
            document.key_marks[(*path, key)] = _location(document.file, key_node.start_mark)
            document.marks.pop((*path, key), None)  # an explicit key beats one merged in earlier
            _walk(value_node, (*path, key), document, on_stack, depth + 1)
    on_stack.discard(id(node))


def _merged_pairs(value_node: Any) -> Iterator[tuple[Any, Any]]:
    """The (key, value) node pairs that ``<<: value_node`` merges in: from one mapping or a list of them."""
    sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
    for source in sources:
        if isinstance(source, yaml.MappingNode):
            yield from source.value


def _scalar_key(node: Any) -> str | int | None:
    if not isinstance(node, yaml.ScalarNode):
        return None
    if node.tag == "tag:yaml.org,2002:int":
        try:
            return int(node.value)
        except ValueError:
            return node.value
    return node.value


# --set overrides -------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[FieldPath, Any]:
    """``"subjects.0.prompts=[a, b]"`` -> ``(("subjects", 0, "prompts"), ["a", "b"])``.

    The value is parsed as YAML; digits in the path index lists. Raises `ValueError` with a message.
    """
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError("expected `dotted.path=value`")
    parts = key.strip().split(".")
    if any(not part for part in parts):
        raise ValueError(f"empty component in the path {key.strip()!r}")
    path = tuple(int(part) if part.isdigit() else part for part in parts)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"the value is not valid YAML: {str(error).splitlines()[0]}") from None
    return path, value


def apply_overrides(document: YamlDocument, overrides: Sequence[str]) -> list[Problem]:
    """Apply ``--set path=value`` overrides in order; values they set are located at ``--set <text>``."""
    problems = []
    for text in overrides:
        where = Location(f"--set {text}")
        try:
            path, value = parse_override(text)
            _set_path(document.data, path, value)
        except ValueError as error:
            hint = "for example `--set defaults.seeds=[0,1]`" if "=" not in text else None
            problems.append(Problem(where.file, None, None, "", str(error), hint))
            continue
        for marks in (document.marks, document.key_marks):
            for stale in [p for p in marks if p[: len(path)] == path]:
                del marks[stale]
        document.marks[path] = where
        document.key_marks[path] = where
    return problems


def _set_path(data: Any, path: FieldPath, value: Any) -> None:
    if not isinstance(data, dict):
        raise ValueError("the manifest is not a mapping, there is nothing to set")
    current = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = format_field_path(path[:depth]) or "the manifest"
        if isinstance(current, dict):
            if isinstance(part, int):
                part = str(part)
            if last:
                current[part] = value
            else:
                current = current.setdefault(part, {})
        elif isinstance(current, list):
            if not isinstance(part, int):
                raise ValueError(f"{where} is a list: index it with a number, not {part!r}")
            if not 0 <= part < len(current):
                items = f"{len(current)} item{'s' if len(current) != 1 else ''}"
                raise ValueError(f"index {part} is out of range: {where} has {items}")
            if last:
                current[part] = value
            else:
                current = current[part]
        else:
            raise ValueError(f"cannot set {part!r} inside {where}, which is a {type(current).__name__}")


# Pydantic errors -> problems -------------------------------------------------------------------------


def _clean_loc(loc: Sequence[Any], data: Any, missing: bool = False) -> tuple[FieldPath, bool]:
    """Follow a pydantic `loc` through the data, dropping union tags; True when it names a dict key."""
    path: list[str | int] = []
    current = data
    is_key = False
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(current, dict) and part in current:
            path.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        elif part == "[key]":
            is_key = True
        elif missing and last and isinstance(part, str):
            path.append(part)
    return tuple(path), is_key


def _model_at(root: type[BaseModel], path: FieldPath) -> type[BaseModel] | None:
    """The schema class that describes the mapping at `path` (for "did you mean" hints)."""
    model = root
    skip_next_key = False
    for part in path:
        if isinstance(part, int):
            continue
        if skip_next_key:  # a key of a free-form dict (component names)
            skip_next_key = False
            continue
        info = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if info is None:
            return None
        annotation = info.annotation
        skip_next_key = typing.get_origin(annotation) is dict
        found = _models_in(annotation)
        if not found:
            return None
        model = found[0]
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _problem_from_error(
    error: dict, document: YamlDocument, root: type[BaseModel], prefix: FieldPath, data: Any
) -> Problem:
    """One pydantic error on `data` (the document's value at `prefix`) as a located problem."""
    kind = error["type"]
    sub_path, is_key = _clean_loc(error["loc"], data, missing=kind == "missing")
    path = (*prefix, *sub_path)
    value = error.get("input")
    context = error.get("ctx") or {}
    hint = None
    if kind == "squeeze":
        message, hint = error["msg"], context.get("hint")
    elif kind == "missing":
        # Located at the mapping that lacks the key: the key itself has no line.
        message = f"missing required key `{path[-1]}`"
        hint = "add `version: 1` as the first line" if path == ("version",) else None
        return document.problem(path[:-1], message, hint)
    elif kind == "extra_forbidden":
        message = f"unknown key `{path[-1]}`"
        model = _model_at(root, sub_path[:-1])
        allowed = [f.alias or n for n, f in model.model_fields.items()] if model else []
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean `{close[0]}`?"
        elif allowed:
            hint = f"allowed: {', '.join(allowed)}"
        return document.problem(path, message, hint, key=True)
    elif kind in _TYPE_MESSAGES:
        message = f"{_TYPE_MESSAGES[kind]}, got {_describe(value)}"
    elif kind == "seeds_shape":
        message = f"expected a list of seeds or {{count: N, base: B}}, got {_describe(value)}"
        hint = "for example `seeds: [0, 1, 2]` or `seeds: {count: 4, base: 0}`"
    elif kind == "literal_error":
        message = f"must be one of {context.get('expected', '')}, got {_describe(value)}"
    elif kind == "too_short":
        message = "must not be empty"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {_describe(value)})"
    return document.problem(path, message, hint, key=is_key)


def validate_schema(
    model: type[BaseModel], document: YamlDocument, prefix: FieldPath = ()
) -> tuple[BaseModel | None, list[Problem]]:
    """Validate the data at `prefix` of `document` against `model`; errors become located problems."""
    data = document.data
    for part in prefix:
        data = data[part]
    try:
        return model.model_validate(data), []
    except ValidationError as error:
        return None, [_problem_from_error(e, document, model, prefix, data) for e in error.errors()]


# Loading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedPrompt:
    index: int
    template: str  # as written, placeholders included
    text: str  # placeholders substituted
    params: SamplingParams
    seeds: Sequence[int]  # a tuple, or a range for {count, base}
    location: Location | None = None  # where the prompt is written, for problems found after loading


@dataclass(frozen=True)
class ResolvedSubject:
    index: int
    name: str
    class_noun: str | None
    references: tuple[str, ...]  # absolute paths, sorted, deduplicated
    prompts: tuple[ResolvedPrompt, ...]


@dataclass(frozen=True)
class LoadedManifest:
    """A validated manifest with its recipe merged in and its references found: all the planner needs."""

    path: Path
    document: Manifest
    recipe: Recipe | None
    model: ModelSpec
    model_identity: str
    output_dir: Path
    max_jobs: int
    subjects: tuple[ResolvedSubject, ...]

    @property
    def num_jobs(self) -> int:
        return _count_jobs(self.subjects)

    def resolved_dict(self) -> dict[str, Any]:
        """A self-contained manifest that plans the same jobs: every path absolute, every value explicit.

        Written as ``manifest.resolved.yaml`` next to the outputs, so a run can be reproduced from it.
        """
        return {
            "version": MANIFEST_VERSION,
            **({"recipe": self.recipe.source} if self.recipe is not None else {}),
            "model": self.model.model_dump(mode="json"),
            "output": {**self.document.output.model_dump(mode="json"), "dir": str(self.output_dir)},
            "max_jobs": self.max_jobs,
            "subjects": [
                {
                    "name": subject.name,
                    **({"class": subject.class_noun} if subject.class_noun is not None else {}),
                    "references": list(subject.references),
                    "prompts": [
                        {
                            "text": prompt.template,
                            **prompt.params.to_dict(),
                            "seeds": _seeds_to_yaml(prompt.seeds),
                        }
                        for prompt in subject.prompts
                    ],
                }
                for subject in self.subjects
            ],
        }

    def resolved_yaml(self) -> str:
        header = "# Written by squeeze: the manifest as it was run, every value explicit.\n"
        return header + yaml.safe_dump(
            self.resolved_dict(), sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None
        )


def _count_jobs(subjects: Iterable[ResolvedSubject]) -> int:
    return sum(len(prompt.seeds) for subject in subjects for prompt in subject.prompts)


def _seeds_to_yaml(seeds: Sequence[int]) -> Any:
    if isinstance(seeds, range):
        return {"count": len(seeds), "base": seeds.start}
    return list(seeds)


def load_manifest(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    recipe: str | None = None,
    max_jobs: int | None = None,
) -> LoadedManifest:
    """Read, validate and resolve a manifest; nothing is loaded but the YAML and image headers.

    Args:
        path: the manifest file. References, the output dir and a recipe path are relative to its folder.
        overrides: ``dotted.path=value`` strings (``--set``), applied in order before validation.
        recipe: a preset name or path that replaces the manifest's `recipe` (``--recipe``).
        max_jobs: job limit (``--max-jobs``); beats the manifest's `max_jobs`, default `DEFAULT_MAX_JOBS`.

    Raises:
        `ManifestError`: with every problem found, each located in the file (or at the ``--set`` flag).
    """
    manifest_path = Path(path).expanduser().absolute()
    file = str(path)
    text = read_manifest_text(manifest_path, file)
    document = load_yaml(text, file)
    problems = list(document.problems)
    if document.data is None:
        raise ManifestError(problems)
    problems += apply_overrides(document, overrides)
    if recipe is not None and isinstance(document.data, dict):
        document.data["recipe"] = recipe
        document.marks[("recipe",)] = Location(f"--recipe {recipe}")

    # The top level and each subject are validated separately, so a typo in one subject does not hide
    # a missing reference in another: every check that can run does.
    head, head_problems = validate_schema(_ManifestHead, document)
    problems += head_problems
    subjects: list[Subject | None] = []
    raw_subjects = document.data.get("subjects") if isinstance(document.data, dict) else None
    for index in range(len(raw_subjects) if isinstance(raw_subjects, list) else 0):
        subject, subject_problems = validate_schema(Subject, document, ("subjects", index))
        problems += subject_problems
        subjects.append(subject)
    resolver = _Resolver(document, head, subjects, manifest_path)
    loaded = resolver.resolve(max_jobs)
    problems += resolver.problems
    if problems or loaded is None:
        raise ManifestError(sort_problems(problems))
    return loaded


def read_manifest_text(path: Path, file: str) -> str:
    """The manifest's text; a missing, unreadable or non-UTF-8 file raises `ManifestError`."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        data = path.read_bytes()
    except OSError as error:
        hints = {
            IsADirectoryError: "give the path of the manifest's .yaml file, not of its folder",
            PermissionError: "check the file's permissions",
        }
        hint = next((text for kind, text in hints.items() if isinstance(error, kind)), None)
        reason = error.strerror or str(error)
        raise ManifestError(
            [Problem(file, None, None, "", f"cannot read the manifest: {reason}", hint)]
        ) from None
    encoding = next((name for bom, name in _UNICODE_BOMS if data.startswith(bom)), None)
    if encoding is not None:
        raise ManifestError(
            [Problem(file, None, None, "", f"the manifest is {encoding} text", "save it as UTF-8")]
        )
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte order mark is harmless: skip it
    except UnicodeDecodeError as error:
        line, column = _position(data, error.start)
        raise ManifestError(
            [
                Problem(
                    file,
                    line,
                    column,
                    "",
                    f"the manifest is not UTF-8 text (byte 0x{data[error.start]:02x})",
                    "save it as UTF-8",
                )
            ]
        ) from None


# Byte order marks of the encodings an editor may save a manifest in by mistake (UTF-32 first: its BOM
# starts with UTF-16's).
_UNICODE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def sort_problems(problems: Sequence[Problem]) -> list[Problem]:
    """Problems in files first (unlocated ones, then by line and column), then those located at
    command-line flags, in the order they were found."""
    return sorted(
        problems, key=lambda p: (p.file.startswith("--"), p.line is not None, p.line or 0, p.column or 0)
    )


class _Resolver:
    """The semantic checks that need more than one field: recipe, references, placeholders, limits.

    Runs on whatever validated: with `head` None (a broken top level) only the subjects are checked.
    """

    def __init__(
        self,
        document: YamlDocument,
        head: Manifest | None,
        subjects: list[Subject | None],
        manifest_path: Path,
    ):
        self.document = document
        self.head = head
        self.subjects = subjects
        self.manifest_path = manifest_path
        self.base_dir = manifest_path.parent
        self.problems: list[Problem] = []

    def problem(self, path: FieldPath, message: str, hint: str | None = None) -> None:
        self.problems.append(self.document.problem(path, message, hint))

    def resolve(self, max_jobs: int | None) -> LoadedManifest | None:
        from squeeze_cli.recipes import model_identity  # here: squeeze_cli.recipes imports this module

        recipe, model = self.resolve_model() if self.head is not None else (None, None)
        names_seen: dict[str, int] = {}
        subjects = []
        for index, subject in enumerate(self.subjects):
            name = subject.name if subject is not None else self.raw_subject(index).get("name")
            if isinstance(name, str):
                folded = name.casefold()  # case-insensitive file systems would merge the folders
                if folded in names_seen:
                    self.problem(
                        ("subjects", index, "name"),
                        f"subject name {name!r} is already used by subjects[{names_seen[folded]}]",
                        "subject names must be unique (ignoring case): they name the output folders",
                    )
                names_seen.setdefault(folded, index)
            if subject is not None:
                subjects.append(self.resolve_subject(index, subject, recipe))
            else:
                self.check_invalid_subject(index)

        limit = max_jobs or (self.head.max_jobs if self.head is not None else None) or DEFAULT_MAX_JOBS
        total = _count_jobs(subjects)
        if total > limit:
            self.problem(
                ("subjects",),
                f"the manifest plans {total:,} jobs, more than the limit of {limit:,}",
                "raise it with `--max-jobs N` or `max_jobs: N` if that many images is intended",
            )
        output_dir = self.resolve_output_dir() if self.head is not None else None
        if self.problems or model is None or self.head is None or None in self.subjects:
            return None
        fields = {name: getattr(self.head, name) for name in Manifest.model_fields if name != "subjects"}
        document = Manifest.model_construct(self.head.model_fields_set, **fields, subjects=self.subjects)
        return LoadedManifest(
            path=self.manifest_path,
            document=document,
            recipe=recipe,
            model=model,
            model_identity=model_identity(model),
            output_dir=output_dir,
            max_jobs=limit,
            subjects=tuple(subjects),
        )

    def resolve_output_dir(self) -> Path | None:
        """The output folder, absolute. Any place is allowed (it is the user's choice), but it must be a
        folder or creatable as one: a file in the way is reported now rather than after the model loads."""
        written = self.head.output.dir
        path: FieldPath = ("output", "dir")
        if "\0" in written:
            self.problem(path, f"{written!r} contains a NUL character", "remove it from the path")
            return None
        output_dir = Path(os.path.expanduser(written))
        output_dir = (self.base_dir / output_dir).resolve() if not output_dir.is_absolute() else output_dir
        reason = output_dir_problem(output_dir)
        if reason:
            self.problem(
                path,
                f"{written!r} cannot be the output folder: {reason}",
                "choose another `output.dir` (or `--out`)",
            )
        return output_dir

    # The model: recipe < manifest `model:` ------------------------------------------------------------

    def resolve_model(self) -> tuple[Recipe | None, ModelSpec | None]:
        from squeeze_cli.recipes import load_recipe, merge_model, resolve_model_paths

        recipe = None
        head = self.head
        if head.recipe is not None:
            try:
                recipe = load_recipe(head.recipe, relative_to=self.base_dir)
            except RecipeError as error:
                self.problem(("recipe",), error.message, error.hint)
                return None, None
            except ManifestError as error:  # a broken recipe file: its own located problems
                self.problems += error.problems
                return None, None
        elif head.model is None:
            self.problem(
                (),
                "no model: the manifest sets neither `recipe` nor `model`",
                "add `recipe: tiny` to try the tool, or see `squeeze recipes` for the presets",
            )
            return None, None

        base = recipe.model.model_dump(exclude_unset=True) if recipe is not None else {}
        merged = merge_model(base, head.model or {})
        # Validate the merged section where the manifest wrote it, so locations point into the manifest
        # (keys that only the recipe sets are located at the manifest's `recipe:` line).
        self.document.data["model"] = merged
        if ("model",) not in self.document.marks and ("recipe",) in self.document.marks:
            self.document.marks[("model",)] = self.document.marks[("recipe",)]
        spec, problems = validate_schema(ModelSpec, self.document, ("model",))
        self.problems += problems
        if spec is None:
            return recipe, None
        return recipe, resolve_model_paths(spec, self.base_dir)

    # Subjects ---------------------------------------------------------------------------------------

    def text_path(self, prompt_path: FieldPath) -> FieldPath:
        """Where a prompt's text is written: its `text` key, or the prompt itself when written as a string."""
        text_path = (*prompt_path, "text")
        return text_path if text_path in self.document.marks else prompt_path

    def raw_subject(self, index: int) -> dict[str, Any]:
        raw = self.document.data["subjects"][index]
        return raw if isinstance(raw, dict) else {}

    def check_invalid_subject(self, index: int) -> None:
        """The checks that still make sense for a subject that failed validation: references, placeholders."""
        raw = self.raw_subject(index)
        path: FieldPath = ("subjects", index)
        references = raw.get("references")
        if isinstance(references, list) and all(isinstance(r, str) for r in references):
            self.resolve_references(path, references)
        name, noun = raw.get("name"), raw.get("class")
        stand_in = Subject.model_construct(
            name=name if isinstance(name, str) else "", class_noun=noun if isinstance(noun, str) else None
        )
        prompts = raw.get("prompts")
        for prompt_index, prompt in enumerate(prompts if isinstance(prompts, list) else []):
            text = prompt.get("text") if isinstance(prompt, dict) else prompt
            if isinstance(text, str):
                self.substitute(self.text_path((*path, "prompts", prompt_index)), text, stand_in)

    def resolve_subject(self, index: int, subject: Subject, recipe: Recipe | None) -> ResolvedSubject:
        path: FieldPath = ("subjects", index)
        references = self.resolve_references(path, subject.references)
        levels: list[tuple[FieldPath, SamplingOverrides]] = []
        if recipe is not None:
            levels.append(((), recipe.defaults))
        defaults = self.head.defaults if self.head is not None else SamplingOverrides()
        levels += [(("defaults",), defaults), (path, subject)]
        base = SamplingParams()
        for _, level in levels:
            base = replace(base, **level.explicit())
        base_seeds = next((lvl.seeds for _, lvl in reversed(levels) if lvl.seeds is not None), None)

        prompts = []
        seen: dict[tuple[str, SamplingParams], list[int]] = {}
        for prompt_index, spec in enumerate(subject.prompts):
            prompt_path = (*path, "prompts", prompt_index)
            overrides = spec.explicit()
            params = replace(base, **overrides) if overrides else base
            seed_spec = spec.seeds if spec.seeds is not None else base_seeds
            seeds = _seed_values(seed_spec)
            text_path = self.text_path(prompt_path)
            text = self.substitute(text_path, spec.text, subject)
            self.check_prompt(prompt_path, params, [*levels, (prompt_path, spec)])
            for other in seen.get((text, params), []):
                if _seeds_overlap(seeds, prompts[other].seeds):
                    self.problem(
                        prompt_path,
                        f"same text, parameters and seeds as prompts[{other}]: the images would be identical",
                        "remove it, or give it different seeds",
                    )
                    break
            seen.setdefault((text, params), []).append(prompt_index)
            location = self.document.locate(text_path)
            prompts.append(ResolvedPrompt(prompt_index, spec.text, text, params, seeds, location))
        return ResolvedSubject(index, subject.name, subject.class_noun, references, tuple(prompts))

    def substitute(self, text_path: FieldPath, template: str, subject: Subject) -> str:
        """`template` with its placeholders filled in; problems with them are located at `text_path`."""

        def replace_placeholder(match: re.Match) -> str:
            token = match.group(0)
            if token in ("{{", "}}"):
                return token[0]
            if token in ("{", "}"):
                self.problem(
                    text_path,
                    f"unmatched {token} at character {match.start() + 1}",
                    f"write {token}{token} for a literal brace, or close it: {{subject}}, {{class}}",
                )
                return token
            name = match.group(1)
            if name == "subject":
                return subject.name
            if name == "class":
                if subject.class_noun is None:
                    self.problem(
                        text_path,
                        "uses {class} but the subject has no class noun",
                        "add `class: <noun>` to it",
                    )
                return subject.class_noun or ""
            self.problem(
                text_path,
                f"unknown placeholder {token}",
                "known: {subject}, {class}; write {{ and }} for literal braces",
            )
            return token

        text = (
            _PLACEHOLDER_RE.sub(replace_placeholder, template)
            if "{" in template or "}" in template
            else template
        )
        if not text.strip():
            self.problem(text_path, "the prompt is empty")
        return text

    def check_prompt(
        self, path: FieldPath, params: SamplingParams, levels: list[tuple[FieldPath, SamplingOverrides]]
    ) -> None:
        if params.true_cfg_scale > 1.0 and params.negative_prompt is None:
            where = next((p for p, lvl in reversed(levels) if "true_cfg_scale" in lvl.model_fields_set), path)
            self.problem(
                (*where, "true_cfg_scale") if where else ("recipe",),
                "true_cfg_scale > 1 has no effect without a negative_prompt",
                'set `negative_prompt` (an empty one is `negative_prompt: ""`)',
            )

    def resolve_references(self, path: FieldPath, patterns: list[str]) -> tuple[str, ...]:
        found: dict[str, int] = {}  # file -> index of the first pattern that named it
        from_glob: set[str] = set()
        folder_hint = f"paths are relative to the manifest's folder {self.base_dir}"
        for ref_index, pattern in enumerate(patterns):
            ref_path = (*path, "references", ref_index)
            if "\0" in pattern:
                self.problem(ref_path, f"{pattern!r} contains a NUL character", "remove it from the path")
                continue
            absolute = os.path.join(self.base_dir, os.path.expanduser(pattern))
            if glob.has_magic(pattern):
                matches = [m for m in glob.glob(absolute, recursive=True) if os.path.isfile(m)]
                if not matches:
                    self.problem(ref_path, f"no file matches {pattern!r}", folder_hint)
                for match in matches:
                    normalized = os.path.normpath(match)
                    found.setdefault(normalized, ref_index)
                    from_glob.add(normalized)
            elif os.path.islink(absolute) and not os.path.exists(absolute):
                self.problem(
                    ref_path,
                    f"{pattern!r} is a broken symbolic link (to {os.readlink(absolute)!r})",
                    "point it at an existing image, or list the image itself",
                )
            elif not os.path.exists(absolute):
                self.problem(ref_path, f"no such file: {pattern!r}", folder_hint)
            elif os.path.isdir(absolute):
                self.problem(
                    ref_path,
                    f"{pattern!r} is not a file",
                    f"to use every image in it: '{pattern.rstrip('/')}/*'",
                )
            elif not os.path.isfile(absolute):  # a device, a pipe, a socket: never open those
                self.problem(ref_path, f"{pattern!r} is not a regular file", "list image files only")
            else:
                found.setdefault(os.path.normpath(absolute), ref_index)
        references = tuple(sorted(found))
        for reference in references:
            message = check_image(reference)
            if message:
                shown = os.path.relpath(reference, self.base_dir)
                hint = _IMAGE_HINTS.get(message.split(":")[0].split(" (")[0])
                if reference in from_glob and message.startswith("not a readable image"):
                    hint = f"{patterns[found[reference]]!r} matches it: narrow the pattern, e.g. to *.jpg"
                self.problem((*path, "references", found[reference]), f"{shown}: {message}", hint)
        return references


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be an output folder (a file is in the way), or None; creates nothing.

    For `output.dir` here and for `--out` (which the manifest does not see)."""
    if "\0" in str(path):
        return "the path contains a NUL character"
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir():
        return None
    return f"{'it' if existing == path else repr(str(existing))} is a file, not a folder"


# The fix for each kind of unusable reference image, keyed by the start of `check_image`'s message.
_IMAGE_HINTS = {
    "the file is empty": "replace it with the image, or remove it from the references",
    "the file is truncated": "the download or copy was cut short: copy the image again",
    "the file is damaged": "copy the image again, or re-save it with an image editor",
    "not a readable image": "use a PNG, JPEG, WebP, BMP, TIFF or GIF image",
    "the image is too large": f"downscale it to at most {MAX_REFERENCE_PIXELS:,} pixels (e.g. 4096x4096)",
}


def check_image(path: str) -> str | None:
    """Why `path` is not a usable reference image; None when it is fine.

    The header gives the size (decompression bombs are refused before any pixel is decoded); then a
    cheap check that the pixel data is all there, so a truncated file is caught before anything runs:
    PNG chunks are read through to IEND with their checksums (no decompression), a JPEG's scans must
    reach its end-of-image marker, and the rarer formats are decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "the file is empty"
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit, raises above
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=REFERENCE_FORMATS) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    return f"the image has no pixels ({width}x{height})"
                if width * height > MAX_REFERENCE_PIXELS:
                    return (
                        f"the image is too large: {width}x{height}, more than {MAX_REFERENCE_PIXELS:,} pixels"
                    )
                if image.format == "PNG":
                    image.verify()
                elif image.format == "JPEG":
                    if not _jpeg_is_complete(path):
                        return "the file is truncated: the JPEG data stops before its end marker"
                else:
                    image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return (
            f"the image is too large: its header declares more than {Image.MAX_IMAGE_PIXELS:,} pixels "
            "(a decompression bomb?)"
        )
    except UnidentifiedImageError:
        return f"not a readable image (supported: {', '.join(REFERENCE_FORMATS)})"
    except (EOFError, OSError, SyntaxError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, EOFError) or "truncated" in reason.lower():
            return f"the file is truncated: {reason}"
        if isinstance(error, SyntaxError) or "broken" in reason.lower() or "crc" in reason.lower():
            return f"the file is damaged: {reason}"
        if isinstance(error, OSError) and error.errno is not None:  # the file system's complaint
            return f"cannot read it: {error.strerror or reason}"
        return f"the file is damaged: {reason}"  # the decoder's
    except Exception as error:  # a decoder's unexpected complaint about a hostile file is still a refusal
        return f"the file is damaged: {type(error).__name__}: {' '.join(str(error).split())}"
    return None


def _jpeg_is_complete(path: str) -> bool:
    """Whether the JPEG's entropy-coded data reaches an end-of-image marker (FFD9).

    Walks the marker segments to the first start-of-scan, then looks for FFD9 after it: inside scan data
    0xFF is always followed by 0x00 or a restart marker, so the first FFD9 there is the real end. Bytes
    after it (a camera's trailer, a motion photo's video) are allowed. Reads the file once, no decoding.
    """
    with open(path, "rb") as file:
        data = file.read()
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # start of scan: the entropy-coded data follows its header
            return data.find(b"\xff\xd9", position + 2 + length) != -1
        if marker == 0xD9:
            return False  # an end marker before any scan: no image data
        position += 2 + length
    return False


def _seed_values(spec: list[int] | SeedRange | None) -> Sequence[int]:
    if spec is None:
        return (0,)
    if isinstance(spec, SeedRange):
        return spec.seeds()
    return tuple(spec)


def _seeds_overlap(first: Sequence[int], second: Sequence[int]) -> bool:
    if isinstance(first, range) and isinstance(second, range):
        return max(first.start, second.start) < min(first.stop, second.stop)
    small, large = (first, second) if len(first) <= len(second) else (second, first)
    lookup = large if isinstance(large, range) else set(large)
    return any(seed in lookup for seed in small)
