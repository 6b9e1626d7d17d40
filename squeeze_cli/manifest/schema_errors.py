"""Pydantic's errors on a located YAML document, as located `Problem`s: the line and column of the value
(or of the key, for an unknown one), a message in squeeze's words, and a hint (a close key name, the name
squeeze uses for a key from another tool)."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from squeeze_cli.errors import Problem
from squeeze_cli.manifest.located import FieldPath, YamlDocument

ModelT = TypeVar("ModelT", bound=BaseModel)


def schema_error(message: str, hint: str | None = None) -> PydanticCustomError:
    """The error a schema validator raises; `validate_schema` turns it into a located `Problem`."""
    return PydanticCustomError("squeeze", "{message}", {"message": message, "hint": hint})


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


# The lists whose items are text: a single string given instead is most likely their one item.
_LISTS_OF_TEXT = {"prompts", "scenes", "references"}


# Names people bring from other tools (A1111, ComfyUI, diffusers scripts) -> (the key here, the hint).
OTHER_TOOLS_NAMES: dict[str, tuple[str, str]] = {
    "steps": ("num_inference_steps", "squeeze calls it `num_inference_steps`"),
    "cfg": (
        "guidance_scale",
        "FLUX's distilled guidance is `guidance_scale` (2.5 in the paper); real CFG is `true_cfg_scale` "
        "with a `negative_prompt`",
    ),
    "scale": ("guidance_scale", "did you mean `guidance_scale` (FLUX's distilled guidance)?"),
    "size": ("width", "set `width` and `height` (multiples of 16), e.g. `width: 512` and `height: 512`"),
    "resolution": (
        "width",
        "set `width` and `height` (multiples of 16), e.g. `width: 512` and `height: 512`",
    ),
    "seed": ("seeds", "squeeze takes a list: `seeds: [42]` (or `seeds: {count: 4, base: 0}`)"),
    "negative": ("negative_prompt", "did you mean `negative_prompt`? (used only with `true_cfg_scale` > 1)"),
    "prompt": ("prompts", 'a subject takes a list: `prompts: ["a {class} on the beach"]`'),
}
OTHER_TOOLS_NAMES["cfg_scale"] = OTHER_TOOLS_NAMES["guidance"] = OTHER_TOOLS_NAMES["cfg"]
OTHER_TOOLS_NAMES["resolution"] = OTHER_TOOLS_NAMES["size"]
OTHER_TOOLS_NAMES["num_steps"] = OTHER_TOOLS_NAMES["sampling_steps"] = OTHER_TOOLS_NAMES["steps"]


def _text_with_a_colon(key: Any, value: Any) -> str | None:
    """The fix for a text with `: ` in it, which YAML reads as a key and its value (no key has a space)."""
    if not isinstance(key, str) or " " not in key.strip() or isinstance(value, (dict, list)):
        return None
    text = key if value is None else f"{key}: {value}"
    return f'YAML reads a text with ": " in it as a key and a value: quote the whole text, e.g. "{text}"'


def _problem_from_error(
    error: ErrorDetails, document: YamlDocument, root: type[BaseModel], prefix: FieldPath, data: Any
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
    elif kind == "missing" and error["loc"] and isinstance(error["loc"][-1], int):
        # A fixed-length list one item short (`background: [255, 255]`): located at the list.
        return document.problem(path, f"too few items: item {error['loc'][-1] + 1} is missing")
    elif kind == "missing":
        # Located at the mapping that lacks the key: the key itself has no line.
        message = f"missing required key `{path[-1]}`"
        hint = "add `version: 1` as the first line" if path == ("version",) else None
        if isinstance(value, dict) and len(value) == 1:  # `- a {class}: red` is {"a {class}": "red"}
            hint = _text_with_a_colon(*next(iter(value.items()))) or hint
        return document.problem(path[:-1], message, hint)
    elif kind == "extra_forbidden":
        message = f"unknown key `{path[-1]}`"
        model = _model_at(root, sub_path[:-1])
        allowed = [f.alias or n for n, f in model.model_fields.items()] if model else []
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.6)
        if _text_with_a_colon(path[-1], value):
            hint = _text_with_a_colon(path[-1], value)
        elif path[-1] in OTHER_TOOLS_NAMES and OTHER_TOOLS_NAMES[path[-1]][0] in allowed:
            hint = OTHER_TOOLS_NAMES[path[-1]][1]
        elif close:
            hint = f"did you mean `{close[0]}`?"
        elif allowed:
            hint = f"allowed: {', '.join(allowed)}"
        return document.problem(path, message, hint, key=True)
    elif kind in _TYPE_MESSAGES:
        message = f"{_TYPE_MESSAGES[kind]}, got {_describe(value)}"
        if kind == "list_type" and isinstance(value, str) and path[-1] in _LISTS_OF_TEXT:
            # `prompts: a {class} on a table` reads as one string; `[a {class}]` would break on the `{`.
            item = value if len(value) <= 60 else value[:57] + "..."
            hint = f"write one `- {item}` per line"
            flag = document.locate(path).file
            if flag.startswith("--set ") and '"' not in value:  # a list on the command line is YAML's [...]
                key = flag.removeprefix("--set ").partition("=")[0]
                hint = f"""a list: `--set '{key}=["{value}"]'`"""
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
    model: type[ModelT], document: YamlDocument, prefix: FieldPath = ()
) -> tuple[ModelT | None, list[Problem]]:
    """Validate the data at `prefix` of `document` against `model`; errors become located problems."""
    data = document.data
    for part in prefix:
        data = data[part]
    try:
        return model.model_validate(data), []
    except ValidationError as error:
        return None, [_problem_from_error(e, document, model, prefix, data) for e in error.errors()]
