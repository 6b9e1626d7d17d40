"""A subject feed (`subjects_from`): the rows of a CSV, JSONL or Parquet file, each with where it is
written, so that a bad row is reported as ``products.csv:17: references: ...``; and the subject of a row
(`resolve_row`), with the scenes `resolve.py` read once for every row.

A file that cannot be read at all is one `Problem`; a CSV or JSONL line that cannot be parsed is one each,
and the other rows are still read and checked.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze_cli.errors import Problem
from squeeze_cli.manifest.loaded import ResolvedPrompt, ResolvedSubject, seeds_overlap
from squeeze_cli.manifest.located import Location
from squeeze_cli.manifest.schema import UNIQUE_NAMES_HINT, SubjectFeed, subject_name_problem
from squeeze_cli.manifest.templates import Template, literal
from squeeze_cli.params import SamplingParams
from squeeze_cli.reading import MiB, open_regular_file, read_regular_file

# A feed of a million products is some hundreds of MB; a larger file is a mistake (a wrong path).
FEED_MAX_BYTES = 1024 * MiB
FEED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
QUOTE_HINT = 'quote a field that holds a quote, and double its quotes: "12"" pan"'
NESTED_HINT = "give the column text, or a list of texts: one language's title, the photos' paths"
PARQUET_HINT = "install the optional extra: pip install 'squeeze_cli[parquet]' (it adds pyarrow)"


@dataclass(frozen=True)
class FeedRow:
    """One row: its values by column, and where it is (`line` in a CSV or JSONL file, else None)."""

    file: str
    number: int  # 1-based, among the data rows
    line: int | None
    values: dict[str, Any]

    def place(self) -> str:
        """Where the row is, in words: ``products.csv:17`` or ``products.parquet row 17``."""
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file} row {self.number}"

    def problem(self, column: str, message: str, hint: str | None = None) -> Problem:
        """A problem of this row's `column`: at its line, or (Parquet) at its row number."""
        where = column if self.line is not None else f"row {self.number}: {column}"
        return Problem(self.file, self.line, None, where, message, hint)


@dataclass
class Feed:
    path: Path  # absolute
    file: str  # as shown in problems
    columns: list[str]
    rows: list[FeedRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def feed_format(path: str, written: str | None) -> str | None:
    """The feed's format: as written (`format:`), or from the file's suffix; None when neither says."""
    return written or FEED_SUFFIXES.get(os.path.splitext(path)[1].lower())


def read_feed(path: Path, shown: str, format: str) -> Feed:
    """The rows of the feed at `path` (`shown` names it in problems). Never raises for the file's content."""
    feed = Feed(path, shown, [])
    try:
        if format == "parquet":
            _read_parquet(path, feed)
            return feed
        data = read_regular_file(path, FEED_MAX_BYTES)
    except OSError as error:
        feed.problems.append(
            Problem(shown, None, None, "", f"cannot read the feed: {error.strerror or error}")
        )
        return feed
    try:
        text = data.decode("utf-8-sig")  # spreadsheets save CSV with a byte order mark
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        feed.problems.append(
            Problem(shown, line, None, "", "the feed is not UTF-8 text", "export it as UTF-8 (CSV UTF-8)")
        )
        return feed
    (_read_csv if format == "csv" else _read_jsonl)(text, feed)
    return feed


def _read_csv(text: str, feed: Feed) -> None:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:  # the first line that is not blank (an empty one is no header of no columns)
        header = next((cells for cells in reader if any(cell.strip() for cell in cells)), None)
    except csv.Error as error:
        feed.problems.append(
            Problem(feed.file, reader.line_num, None, "", f"not valid CSV: {error}", QUOTE_HINT)
        )
        return
    if header is None:
        feed.problems.append(Problem(feed.file, None, None, "", "the feed is empty", "a header row first"))
        return
    if len(header) == 1 and (separator := next((c for c in ";\t" if c in header[0]), None)):
        # A spreadsheet in a locale with a decimal comma saves "CSV" with semicolons.
        feed.problems.append(
            Problem(
                feed.file,
                reader.line_num,
                None,
                "",
                f"the header is one column, {header[0]!r}: the feed's fields are separated by "
                f"{separator!r}, not commas",
                "export it comma-separated (CSV UTF-8 in a spreadsheet)",
            )
        )
        return
    # A spreadsheet exports formatted but empty columns after the last one: no column, and no field of a row.
    while header and not header[-1].strip():
        header.pop()
    feed.columns = [name.strip() for name in header]
    if not _unique_columns(feed, reader.line_num):
        feed.columns = []  # no row can be read by a name that is not one column's
        return
    first_line = reader.line_num + 1
    number = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:  # at the line the record starts; the reader goes on after it
            feed.problems.append(
                Problem(feed.file, first_line, None, "", f"not valid CSV: {error}", QUOTE_HINT)
            )
            first_line = reader.line_num + 1
            continue
        number += 1
        if not any(cell.strip() for cell in cells):  # a blank line is no product
            first_line = reader.line_num + 1
            continue
        if len(cells) > len(feed.columns) and not any(cell.strip() for cell in cells[len(feed.columns) :]):
            del cells[len(feed.columns) :]
        if len(cells) != len(feed.columns):
            feed.problems.append(
                Problem(
                    feed.file,
                    first_line,
                    None,
                    "",
                    f"{len(cells)} fields, but the header names {len(feed.columns)} columns",
                    'quote a field that holds a comma: "a, b"'
                    if len(cells) > len(feed.columns)
                    else "give every column a field; an empty one is nothing between two commas",
                )
            )
        else:
            values = dict(zip(feed.columns, cells, strict=True))
            feed.rows.append(FeedRow(feed.file, number, first_line, values))
        first_line = reader.line_num + 1


def _unique_columns(feed: Feed, line: int) -> bool:
    seen: set[str] = set()
    for name in feed.columns:
        if name in seen or not name:
            message = f"the column {name!r} appears twice" if name else "a column has no name"
            feed.problems.append(Problem(feed.file, line, None, "", message, "name every column once"))
            return False
        seen.add(name)
    return True


def _read_jsonl(text: str, feed: Feed) -> None:
    columns: dict[str, None] = {}
    number = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            feed.problems.append(
                Problem(feed.file, line_number, error.colno, "", f"not valid JSON: {error.msg}")
            )
            continue
        if not isinstance(values, dict):
            feed.problems.append(
                Problem(
                    feed.file, line_number, None, "", "expected a JSON object per line, with a key per column"
                )
            )
            continue
        number += 1
        columns.update(dict.fromkeys(values))
        feed.rows.append(FeedRow(feed.file, number, line_number, values))
    feed.columns = list(columns)
    if not feed.rows and not feed.problems:
        feed.problems.append(
            Problem(feed.file, None, None, "", "the feed is empty", "one JSON object per line")
        )


def _read_parquet(path: Path, feed: Feed) -> None:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        feed.problems.append(
            Problem(
                feed.file,
                None,
                None,
                "",
                "reading a Parquet feed needs pyarrow, which is not installed",
                PARQUET_HINT,
            )
        )
        return
    from pyarrow import ArrowException

    try:
        with open_regular_file(path) as handle:
            table = parquet.read_table(handle)
    except ArrowException as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        feed.problems.append(Problem(feed.file, None, None, "", f"not a readable Parquet file: {first}"))
        return
    if not table.column_names:  # an export script's empty table: no rows, and no columns to check them by
        feed.problems.append(
            Problem(
                feed.file, None, None, "", "the feed is empty", "export the products with a column per field"
            )
        )
        return
    feed.columns = list(table.column_names)
    feed.rows = [
        FeedRow(feed.file, number, None, values) for number, values in enumerate(table.to_pylist(), 1)
    ]


def cell_text(value: Any) -> str | None:
    """A cell as prompt text: numbers as written, a list joined with commas; None when empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # Parquet's and pandas' "no value"
        return None
    if isinstance(value, list):
        value = ", ".join(text for text in map(cell_text, value) if text)
    text = str(value).strip()
    return text or None


def _nested(value: Any) -> bool:
    """Whether a cell holds an object (a JSON object, a Parquet struct), or a list of them or of lists."""
    return isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value)
    )


def cell_list(value: Any, separator: str) -> list[str]:
    """A cell of several values (references, prompts): a list (JSONL, Parquet) or text split at
    `separator`; empty items dropped."""
    items = (
        value if isinstance(value, list) else (value.split(separator) if isinstance(value, str) else [value])
    )
    return [text for text in map(cell_text, items) if text]


# What a row means --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A shared scene, read once for every row: its template, parameters, seeds and place."""

    template: Template
    params: SamplingParams
    seeds: Sequence[int]
    location: Location


@dataclass(frozen=True)
class Row:
    """What a row's subject gets from outside the row: the feed's folder (where its references start),
    the manifest's parameters and seeds (for the row's own prompts), and its subject index."""

    folder: Path
    params: SamplingParams
    seeds: Sequence[int]
    index: int


FindReferences = Callable[
    [Sequence[str], Sequence[Path], Sequence[str], Callable[[int, str, "str | None"], None]], tuple[str, ...]
]


def resolve_row(
    spec: SubjectFeed,
    row: FeedRow,
    scenes: Sequence[Scene],
    inherited: Row,
    names_seen: dict[str, str],
    find_references: FindReferences,
) -> tuple[ResolvedSubject | None, list[Problem]]:
    """The subject of one row (None when the row has a problem), and the row's problems.

    `names_seen` maps the casefolded names taken so far to where (a row's name is added to it);
    `find_references` is the manifest's reference finder, with the feed's folder as the base.
    """
    problems: list[Problem] = []

    def report(column: str, message: str, hint: str | None = None) -> None:
        problems.append(row.problem(column, message, hint))

    # A nested cell (JSONL, Parquet): its repr must reach no prompt and no path. One the row uses is an error.
    nested = {column for column, value in row.values.items() if _nested(value)}
    cells = {column: None if column in nested else value for column, value in row.values.items()}
    used = {spec.name, spec.class_column, spec.references, spec.prompts}
    used.update(
        spec.class_column if placeholder == "class" else placeholder
        for scene in scenes
        for placeholder in scene.template.names
    )
    reported = {column for column in nested if column in used}
    for nested_column in sorted(reported):
        report(nested_column, "holds an object, not text", NESTED_HINT)

    name = cell_text(cells.get(spec.name))
    if name is None:
        if spec.name not in nested:
            report(spec.name, "empty: every row needs a subject name")
    elif (bad_name := subject_name_problem(name)) is not None:
        report(spec.name, *bad_name)
    elif name.casefold() in names_seen:
        report(
            spec.name,
            f"subject name {name!r} is already used by {names_seen[name.casefold()]}",
            UNIQUE_NAMES_HINT,
        )
    else:
        names_seen[name.casefold()] = row.place()
    class_noun = cell_text(cells.get(spec.class_column)) if spec.class_column else None

    patterns = cell_list(cells.get(spec.references), spec.separator)
    if not patterns and spec.references not in nested:
        report(spec.references, "empty: every row needs at least one reference image")
    references = find_references(
        patterns,
        [inherited.folder] * len(patterns),
        [f"paths are relative to the feed's folder {inherited.folder}"] * len(patterns),
        lambda _, message, hint: report(spec.references, message, hint),
    )

    values = {column: cell_text(value) for column, value in cells.items()}
    values.update({"subject": name, "class": class_noun})
    prompts: list[ResolvedPrompt] = []
    empty = set(reported)  # each empty column once, however many scenes use it
    for index, scene in enumerate(scenes):
        for placeholder in scene.template.names:
            column = spec.class_column if placeholder == "class" else placeholder
            # (A placeholder that is no column was reported once, at the scene.)
            if (
                column is not None
                and placeholder in values
                and values[placeholder] is None
                and column not in empty
            ):
                empty.add(column)
                report(column, f"empty, but scenes[{index}] uses {{{placeholder}}}", "fill it in")
        text = scene.template.fill(values)
        prompts.append(ResolvedPrompt(index, literal(text), text, scene.params, scene.seeds, scene.location))
    for own in cell_list(cells.get(spec.prompts), spec.separator) if spec.prompts else []:
        template = Template(own)
        for message, hint in template.problems:
            report(spec.prompts or "", message, hint)
        for placeholder in template.names:
            if placeholder in nested:
                if placeholder not in empty:
                    empty.add(placeholder)
                    report(placeholder, "holds an object, not text", NESTED_HINT)
            elif values.get(placeholder) is None:
                report(spec.prompts or "", f"{{{placeholder}}} is not a column, or is empty in this row")
        text = template.fill(values)
        where = Location(row.file, row.line)
        prompts.append(
            ResolvedPrompt(len(prompts), literal(text), text, inherited.params, inherited.seeds, where)
        )
    if not prompts and spec.prompts not in nested:
        report(
            spec.prompts or spec.name, "empty, and `subjects_from` has no `scenes`: the row has no prompts"
        )
    seen: dict[tuple[str, SamplingParams], ResolvedPrompt] = {}
    texts = {prompt.text for prompt in prompts}
    for prompt in prompts if len(texts) < len(prompts) else ():  # (no two texts alike: nothing to compare)
        other = seen.setdefault((prompt.text, prompt.params), prompt)
        if other is not prompt and seeds_overlap(prompt.seeds, other.seeds):
            report(
                spec.prompts or spec.name,
                f"prompts {other.index} and {prompt.index} are both {prompt.text!r}: same images twice",
                "make the scenes or the row's prompts differ",
            )
    if problems or name is None:
        return None, problems
    return ResolvedSubject(inherited.index, name, class_noun, references, tuple(prompts)), problems
