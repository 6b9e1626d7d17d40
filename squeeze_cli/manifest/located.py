"""YAML with locations: reading the file, parsing that records each node's file, line and column, and
`--set` overrides (`schema_errors` turns pydantic's errors on the result into located `Problem`s).

The small public layer that every YAML file squeeze reads (manifests, recipes, training configs) goes through,
so each reports every problem at once as ``file:line:column: field: message (hint: ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from squeeze_cli.errors import ManifestError, Problem
from squeeze_cli.reading import MANIFEST_MAX_BYTES, FileTooLargeError, NotARegularFileError, read_regular_file

# Anchors and aliases can expand a small file into a huge tree ("billion laughs"); stop walking early.
MAX_YAML_NODES = 2_000_000
# libyaml stops at 1000 levels; a manifest needs about 6, and deeper trees would exhaust Python's stack.
MAX_YAML_DEPTH = 100


FieldPath = tuple[str | int, ...]


def format_field_path(path: Sequence[str | int]) -> str:
    """``("subjects", 2, "prompts", 0, "seeds")`` -> ``"subjects[2].prompts[0].seeds"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


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


def load_yaml(text: str, file: str, *, empty_hint: str | None = None) -> YamlDocument:
    """Parse one YAML document safely (no Python tags), recording each node's line and column.

    Syntax errors, tabs, several documents, duplicate keys, Python or custom tags, recursive aliases and
    alias explosions become `Problem`s in the result; an empty file too, with `empty_hint` (what the
    file needs at least).
    """
    document = YamlDocument(data=None, file=file)
    # libyaml's parser when present (10x faster on big manifests); the constructor is SafeConstructor
    # either way, so Python tags are refused.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            document.problems.append(_problem_at(file, None, "the file is empty", empty_hint))
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
    if isinstance(text, str):
        line_start, line = text.rfind("\n", 0, index) + 1, text.count("\n", 0, index) + 1
    else:
        line_start, line = text.rfind(b"\n", 0, index) + 1, text.count(b"\n", 0, index) + 1
    return line, index - line_start + 1


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
    quoted = _value_quoted_in_part(text, mark)
    if quoted:
        return message, quoted
    # A key or `-` indented one space more or less than its neighbours ends the block early.
    if "block mapping did not find expected key" in message:
        return message, (
            "check the indentation here and just above: the keys of one mapping line up, "
            "indented with the same number of spaces"
        )
    if "block collection did not find expected '-' indicator" in message:
        return message, (
            "check the indentation here and just above: the `-` items of one list line up, and so do "
            "the keys inside an item"
        )
    if "mapping values are not allowed" in message:
        return message, _colon_in_value(text, mark) or (
            "check the indentation here and just above: a key indented deeper than its neighbours "
            "continues the value before it"
        )
    if "expected a single document" in message:
        return message, "a manifest is one document: remove the `---` line and what follows, or merge them"
    if "flow sequence" in message or "flow mapping" in message:
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        if re.search(r"\[[^\]\n]*[^\s\[,'\"][^\]\n]*\{\w*\}", line):
            return message, (
                'inside [...] a `{` starts a mapping: quote each prompt, e.g. ["a {class} on a rug"], '
                "or write one `- a {class} on a rug` per line"
            )
    return message, None


# A value that opens with `{`, `[` or a quote and goes on after its closing one: `- {class} on a rug`.
_PART_QUOTED_RE = re.compile(
    r"^\s*(?:-\s+)?(?:[\w.-]+:\s+)?((?:\{[^{}]*\}|\[[^\[\]]*\]|'[^']*'|\"[^\"]*\")\s*[^\s#,].*)$"
)


def _value_quoted_in_part(text: str, mark: Any) -> str | None:
    """The fix for a value whose first character makes YAML read only its beginning (a `{class}` is a
    mapping, a quote ends the string): quote the whole value."""
    found = _PART_QUOTED_RE.match(_line_at(text, mark))
    if not found:
        return None
    value = found.group(1).rstrip()
    return f"a value that starts with `{value[0]}` must be quoted whole: {_quoted(value)}"


def _colon_in_value(text: str, mark: Any) -> str | None:
    """The fix for `text: a {class}: at night`, whose second `: ` YAML cannot read: quote the value."""
    found = re.match(r"^\s*(?:-\s+)?[\w.-]+:\s+([^'\"#].*:\s.*?)\s*$", _line_at(text, mark))
    return f'a value with ": " in it must be quoted: {_quoted(found.group(1))}' if found else None


def _line_at(text: str, mark: Any) -> str:
    lines = text.splitlines()
    return lines[mark.line] if mark is not None and mark.line < len(lines) else ""


def _quoted(value: str) -> str:
    return f'"{value}"' if '"' not in value else f"'{value}'"


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
            key_path = (*path, key)
            document.key_marks[key_path] = _location(document.file, key_node.start_mark)
            document.marks.pop(key_path, None)  # an explicit key beats one merged in earlier
            _walk(value_node, key_path, document, on_stack, depth + 1)
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

    The value is parsed as YAML; digits in the path index lists. Raises `ValueError` with a message (an
    `OverrideError` with a hint when the value is not YAML).
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
        message = str(error).splitlines()[0]
        hint = _override_yaml_hint(message, key.strip(), raw_value.strip())
        raise OverrideError(f"the value is not valid YAML: {message}", hint) from None
    return path, value


class OverrideError(ValueError):
    """A `--set` that cannot be parsed, with the fix when there is a likely one."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _override_yaml_hint(message: str, key: str, value: str) -> str:
    if "constructor for the tag" in message:
        return "a value holds plain YAML only: remove the tag"
    if "while parsing a flow" in message:  # `[...]` or `{...}`: a sequence, mapping or node in them
        return (
            "close every `[` and `{`, e.g. `--set 'defaults.seeds=[0,1]'`; text that holds them goes in "
            """quotes: `--set 'subjects.0.prompts.0="a {class} on a rug"'`"""
        )
    # The shell removed the user's own quotes: text with `:`, `@`, a leading `{` or quote needs YAML's.
    key, value = (key, value) if not set("'\"") & set(value) else ("subjects.0.class", "a: b")
    return f"""the value is read as YAML: close its quotes, or quote text, e.g. `--set '{key}="{value}"'`"""


def apply_overrides(document: YamlDocument, overrides: Sequence[str]) -> list[Problem]:
    """Apply ``--set path=value`` overrides in order; values they set are located at ``--set <text>``."""
    problems = []
    for text in overrides:
        where = Location(f"--set {text}")
        try:
            path, value = parse_override(text)
            existed = _set_path(document.data, path, value)
        except ValueError as error:
            hint = getattr(error, "hint", None)
            if "=" not in text:
                hint = "for example `--set defaults.seeds=[0,1]`"
            problems.append(Problem(where.file, None, None, "", str(error), hint))
            continue
        for marks in (document.marks, document.key_marks):
            for stale in [p for p in marks if p[: len(path)] == path]:
                del marks[stale]
        # The mappings the override created (`default` of `default.height=64`) have no line in the file:
        # a problem with them (an unknown key) is the flag's, not the document root's.
        for end in range(min(existed + 1, len(path)), len(path) + 1):
            document.marks[path[:end]] = where
            document.key_marks[path[:end]] = where
    return problems


def _set_path(data: Any, path: FieldPath, value: Any) -> int:
    """Set `path` to `value`; returns how many leading components of `path` already existed."""
    if not isinstance(data, dict):
        raise ValueError("the manifest is not a mapping, there is nothing to set")
    current = data
    existed = len(path)
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = format_field_path(path[:depth]) or "the manifest"
        if isinstance(current, dict):
            if isinstance(part, int):
                part = str(part)
            if part not in current:
                existed = min(existed, depth)
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
    return existed


# Loading ---------------------------------------------------------------------------------------------


def read_manifest_text(path: Path, file: str, kind: str = "manifest", missing_hint: str | None = None) -> str:
    """The text of a manifest (or of another YAML file `kind` names, e.g. a training config); a missing,
    unreadable or non-UTF-8 file raises `ManifestError`, with `missing_hint` when it does not exist."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        # A regular file only, read up to a limit: `/dev/zero` or a FIFO must not hang or eat the memory.
        data = read_regular_file(path, MANIFEST_MAX_BYTES)
    except OSError as error:
        hints = {
            FileNotFoundError: missing_hint,
            IsADirectoryError: f"give the path of the {kind}'s .yaml file, not of its folder",
            PermissionError: "check the file's permissions",
            NotARegularFileError: f"give the path of the {kind}'s .yaml file",
            FileTooLargeError: f"a {kind} is a few kB of YAML: give the {kind}'s .yaml file",
        }
        hint = next((text for kind, text in hints.items() if isinstance(error, kind)), None)
        reason = error.strerror or str(error)
        raise ManifestError(
            [Problem(file, None, None, "", f"cannot read the {kind}: {reason}", hint)]
        ) from None
    encoding = next((name for bom, name in _UNICODE_BOMS if data.startswith(bom)), None)
    if encoding is not None:
        raise ManifestError(
            [Problem(file, None, None, "", f"the {kind} is {encoding} text", "save it as UTF-8")]
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
                    f"the {kind} is not UTF-8 text (byte 0x{data[error.start]:02x})",
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
