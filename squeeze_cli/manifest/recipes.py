"""Model presets ("recipes"): loading, merging and listing the packaged YAML files.

A recipe names a model (a built-in tiny one, a full SqueezePipeline folder or hub id, or one source per
component, plus an optional LoRA) and sampling defaults. Merge order, later wins:
recipe < manifest (`model:`, `defaults:`, subjects, prompts) < ``--set`` < explicit CLI flags.
Torch-free: listing and validating presets never loads a model.

The YAML files live in the top-level ``recipes/`` folder, installed as the data package
``squeeze_cli.recipes``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StrictBool, StrictStr

from squeeze_cli.errors import ManifestError, RecipeError
from squeeze_cli.manifest.located import FieldPath, Location, YamlDocument, load_yaml
from squeeze_cli.manifest.schema import ModelSpec, SamplingOverrides, StrictModel, non_empty
from squeeze_cli.manifest.schema_errors import validate_schema
from squeeze_cli.reading import MANIFEST_MAX_BYTES, read_regular_file

PRESETS_PACKAGE = "squeeze_cli.recipes"
RECIPE_SUFFIXES = (".yaml", ".yml")
# Setting `builtin` or `pipeline` in a manifest replaces the recipe's model source as a whole.
_SOURCE_KEYS = ("builtin", "pipeline", "components")
# The hint of a relative path given by a flag that names nothing there.
COMMAND_LINE_PATHS_HINT = "a path on the command line is relative to the current folder"


class License(StrictModel):
    """The licence of a recipe's weights: what a business may do with them. Packaged recipes state it; a
    recipe file of your own may leave it out (`UNKNOWN_LICENSE`)."""

    name: Annotated[StrictStr, AfterValidator(non_empty)]
    commercial_use: StrictBool | None  # None: not known
    url: StrictStr | None = None


UNKNOWN_LICENSE = License(name="unknown", commercial_use=None)


class RecipeFile(StrictModel):
    """The schema of a recipe file."""

    name: Annotated[StrictStr, AfterValidator(non_empty)]
    description: Annotated[StrictStr, AfterValidator(non_empty)]
    license: License = UNKNOWN_LICENSE
    model: ModelSpec
    defaults: SamplingOverrides = Field(default_factory=SamplingOverrides)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    license: License
    model: ModelSpec
    defaults: SamplingOverrides
    source: str  # the packaged preset's name, or the absolute path of the file it came from
    text: str  # the file as written


def _packaged() -> dict[str, Any]:
    folder = importlib.resources.files(PRESETS_PACKAGE)
    return {
        entry.name.rsplit(".", 1)[0]: entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(RECIPE_SUFFIXES)
    }


def list_recipes() -> list[Recipe]:
    """Every packaged preset, sorted by name."""
    return [load_recipe(name) for name in sorted(_packaged())]


def is_file_path(name_or_path: str) -> bool:
    """Whether a `--recipe` or `--rules` value names a file (has a `/` or ends in `.yaml`/`.yml`) rather
    than something packaged."""
    return "/" in name_or_path or os.sep in name_or_path or name_or_path.lower().endswith(RECIPE_SUFFIXES)


def on_command_line(location: Location) -> bool:
    """Whether a value was given by a flag (`--set`, `--recipe`) rather than written in a file."""
    return location.file.startswith(("--set ", "--recipe "))


def path_base(document: YamlDocument, path: FieldPath, file_folder: str | os.PathLike) -> Path:
    """Where a relative path at `path` of `document` starts: the current folder for a value given on the
    command line, the folder of the file that holds it (`file_folder`) otherwise."""
    return Path.cwd() if on_command_line(document.locate(path)) else Path(file_folder)


def load_recipe(
    name_or_path: str, relative_to: str | os.PathLike | None = None, *, relative_hint: str | None = None
) -> Recipe:
    """Load a packaged preset by name, or a recipe file by path (relative to `relative_to`, default the
    current folder).

    Relative local paths in a recipe *file* are taken relative to that file; those in a packaged preset
    are left for the manifest to resolve (relative to the manifest). `relative_hint` says, when a relative
    path names no file, where such paths start.

    Raises:
        `RecipeError`: unknown name (the message lists the known ones) or unreadable file.
        `ManifestError`: the recipe file has problems, each located in it.
    """
    if is_file_path(name_or_path):
        path = Path(relative_to or ".") / Path(name_or_path).expanduser()
        try:
            # A regular file only, read up to a limit: `/dev/urandom` must not hang or eat the memory.
            text = read_regular_file(path, MANIFEST_MAX_BYTES).decode("utf-8")
        except OSError as error:
            relative = not Path(name_or_path).expanduser().is_absolute()
            raise RecipeError(
                f"cannot read recipe file {str(path)!r}: {error.strerror or error}",
                (relative_hint or f"relative paths start from {Path(relative_to or '.').absolute()}")
                if relative
                else None,
            ) from None
        except UnicodeDecodeError:
            raise RecipeError(
                f"cannot read recipe file {str(path)!r}: it is not UTF-8 text", "give a recipe's .yaml file"
            ) from None
        source, display, base_dir = str(path.absolute()), str(path), path.absolute().parent
    else:
        presets = _packaged()
        if name_or_path not in presets:
            raise RecipeError(
                f"unknown recipe {name_or_path!r}",
                f"known recipes: {', '.join(sorted(presets))}; or give the path of a .yaml file",
            )
        text = presets[name_or_path].read_text(encoding="utf-8")
        source, display, base_dir = name_or_path, f"recipes/{presets[name_or_path].name}", None

    document = load_yaml(text, display)
    if document.problems:
        raise ManifestError(document.problems)
    parsed, problems = validate_schema(RecipeFile, document)
    if problems or not isinstance(parsed, RecipeFile):
        raise ManifestError(problems)
    model = parsed.model if base_dir is None else resolve_model_paths(parsed.model, base_dir)
    return Recipe(parsed.name, parsed.description, parsed.license, model, parsed.defaults, source, text)


def recipe_text(name_or_path: str, relative_to: str | os.PathLike | None = None) -> str:
    """The YAML of a preset as written (``squeeze recipes NAME``)."""
    return load_recipe(name_or_path, relative_to).text


def merge_model(recipe_model: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's model section with a manifest's `model:` overrides merged in (mappings merge deeply).

    A manifest that sets `builtin`, `pipeline` or `pipeline_class` names its own model: the recipe's source
    (`builtin`, `pipeline` and `components`; with `pipeline_class` also `family`) is dropped rather than
    mixed in. `components` alone replaces the named
    components, each as a whole (a subfolder or revision belongs to its path), and keeps the others.
    """
    merged = dict(recipe_model)
    if "builtin" in overrides or "pipeline" in overrides or "pipeline_class" in overrides:
        for key in _SOURCE_KEYS:
            merged.pop(key, None)
    if "pipeline_class" in overrides:
        merged.pop("family", None)  # another pipeline: the recipe's MLLM family means nothing to it
    components = overrides.get("components")
    if isinstance(components, Mapping) and isinstance(merged.get("components"), Mapping):
        merged["components"] = {**merged["components"], **components}
        overrides = {key: value for key, value in overrides.items() if key != "components"}
    return _deep_merge(merged, overrides)


def _deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _looks_local(value: str, base_dir: Path) -> bool:
    # Hub ids look like "org/name", as do relative folders; an explicit ./ or an existing path decides.
    # A deeper path (`runs/tiny/stage2/lora`) is never a hub id: missing, it is a missing folder.
    return (
        value.startswith(("./", "../", "/", "~"))
        or value in (".", "..")
        or value.count("/") > 1
        or (base_dir / value).exists()
    )


def _local(value: str, base_dir: Path) -> str:
    if not _looks_local(value, base_dir):
        return value
    path = base_dir / Path(value).expanduser()
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop: the checks before loading report it
        return os.path.abspath(path)


def model_path_fields(model: Mapping[str, Any]) -> list[FieldPath]:
    """Where a model section (as written, before validation) holds paths: its pipeline, each component's
    and the LoRA's path."""
    components = model.get("components")
    names = [name for name in components if isinstance(name, str)] if isinstance(components, Mapping) else []
    return [("pipeline",), *[("components", name, "path") for name in names], ("lora", "path")]


def resolve_model_paths(
    model: ModelSpec, base_dir: str | os.PathLike, *, from_cwd: Collection[FieldPath] = ()
) -> ModelSpec:
    """`model` with its local paths (pipeline, component and LoRA paths) made absolute from `base_dir`,
    or from the current folder for those in `from_cwd` (given on the command line; see
    `model_path_fields`).

    Hub ids are left alone; a path counts as local when it starts with ``./``, ``../``, ``/`` or ``~``,
    has more than one ``/`` (a hub id is ``name`` or ``org/name``), or exists relative to where it starts.
    """

    def local(value: str, *field: str) -> str:
        return _local(value, Path.cwd() if field in from_cwd else Path(base_dir))

    update: dict[str, Any] = {}
    if model.pipeline is not None:
        update["pipeline"] = local(model.pipeline, "pipeline")
    if model.components:
        update["components"] = {
            name: source.model_copy(update={"path": local(source.path, "components", name, "path")})
            for name, source in model.components.items()
        }
    if model.lora is not None:
        update["lora"] = model.lora.model_copy(update={"path": local(model.lora.path, "lora", "path")})
    return model.model_copy(update=update)


def model_identity(model: ModelSpec | Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a resolved model section; part of every job id.

    Covers the source (builtin, pipeline, components with subfolders and revisions), family, LoRA and its
    scale, and dtype: everything in the section that changes pixels. `trust_remote_code` does not, nor
    does `compile` (float rounding at most, like the batch size), and unset optional keys are left out so
    that adding an optional key to the schema keeps old ids.
    """
    if not isinstance(model, ModelSpec):
        model = ModelSpec.model_validate(model)
    data = model.model_dump(mode="json", exclude_none=True, exclude={"trust_remote_code", "compile"})
    if not data.get("components"):
        data.pop("components", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
