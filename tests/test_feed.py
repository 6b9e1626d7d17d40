"""Subjects from a feed (`subjects_from`): a CSV, JSONL or Parquet product feed becomes subjects x the
manifest's shared scenes, beside hand-written subjects; a bad row is located at its line, every problem at
once; Parquet through the optional pyarrow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from squeeze_cli.errors import ManifestError
from squeeze_cli.manifest import load_manifest

MANIFEST = """\
version: 1
recipe: tiny
defaults: {{height: 32, width: 32, num_inference_steps: 2, seeds: [0]}}
subjects_from:
  path: {feed}
  name: sku
  class: category
  references: images
{extra}  scenes:
    - a {{class}} in {{color}}, {{title}}
    - text: a {{class}} on a table
      seeds: [1, 2]
"""

CSV = """\
sku,category,color,title,images
TP-1,teapot,white,"Porcelain teapot, 1 l",images/teapot/00.jpg|images/teapot/01.jpg
BP-2,backpack,red,Hiking backpack,images/backpack/*.jpg
"""


def _project(make_project, feed: str = CSV, name: str = "products.csv", extra: str = "", subjects: str = ""):
    project = make_project(m=MANIFEST.format(feed=name, extra=extra) + subjects)
    (project / name).write_text(feed)
    return project


def _problems(path: Path | str) -> list[str]:
    with pytest.raises(ManifestError) as error:
        load_manifest(path)
    return [str(problem) for problem in error.value.problems]


def test_rows_become_subjects_times_the_shared_scenes(make_project) -> None:
    project = _project(make_project)
    loaded = load_manifest(project / "m.yaml")
    assert [s.name for s in loaded.subjects] == ["TP-1", "BP-2"]
    teapot, backpack = loaded.subjects
    assert teapot.class_noun == "teapot"
    assert [Path(r).relative_to(project).as_posix() for r in teapot.references] == [
        "images/teapot/00.jpg",
        "images/teapot/01.jpg",
    ]
    assert len(backpack.references) == 2  # the glob, relative to the feed's folder
    assert [p.text for p in teapot.prompts] == [
        "a teapot in white, Porcelain teapot, 1 l",
        "a teapot on a table",
    ]
    assert [list(p.seeds) for p in backpack.prompts] == [[0], [1, 2]]
    assert loaded.num_jobs == 6


def test_the_resolved_manifest_plans_the_same_jobs(make_project, plan_of) -> None:
    # A value with braces must stay text when manifest.resolved.yaml is read back as a manifest.
    project = _project(make_project, CSV.replace("Hiking backpack", "Backpack {XL}"))
    loaded = load_manifest(project / "m.yaml")
    resolved = project / "resolved.yaml"
    resolved.write_text(loaded.resolved_yaml())
    assert [j.job_id for j in plan_of(resolved)] == [j.job_id for j in plan_of(project / "m.yaml")]
    assert "a backpack in red, Backpack {XL}" in [j.prompt for j in plan_of(resolved)]


def test_rows_sit_beside_hand_written_subjects_and_a_name_clash_is_an_error(
    make_project, monkeypatch
) -> None:
    hand = "subjects:\n  - name: dog\n    references: [images/dog/*.jpg]\n    prompts: [a dog]\n"
    project = _project(make_project, subjects=hand)
    assert [s.name for s in load_manifest(project / "m.yaml").subjects] == ["dog", "TP-1", "BP-2"]
    (project / "products.csv").write_text(CSV + "DOG,dog,brown,A dog,images/dog/00.jpg\n")
    monkeypatch.chdir(project)
    assert _problems(project / "m.yaml") == [
        "products.csv:4: sku: subject name 'DOG' is already used by subjects[0] (hint: subject names must be "
        "unique (ignoring case): they name the output folders)"
    ]


def test_every_bad_row_is_located_at_once(make_project, monkeypatch) -> None:
    feed = (
        CSV
        + "CAN-3,can,,Soda can,images/can/missing.jpg\n"  # line 4: an empty placeholder, a missing file
        + "bad name!,can,blue,Can,images/can/00.jpg\n"  # line 5
        + "TP-1,teapot,green,Again,images/teapot/00.jpg\n"  # line 6: the name of line 2
        + "CAN-7,can,blue,Can,\n"  # line 7: no references
        + "CAN-8,can,blue\n"  # line 8: too few fields
    )
    project = _project(make_project, feed)
    monkeypatch.chdir(project)
    problems = _problems(project / "m.yaml")
    assert problems == [
        "products.csv:4: images: no such file: 'images/can/missing.jpg' "
        f"(hint: paths are relative to the feed's folder {project})",
        "products.csv:4: color: empty, but scenes[0] uses {color} (hint: fill it in)",
        "products.csv:5: sku: 'bad name!' is not usable as a folder name (hint: use 1-64 letters, digits, "
        "'.', '_' or '-', starting with a letter or digit)",
        "products.csv:6: sku: subject name 'TP-1' is already used by products.csv:2 (hint: subject names "
        "must be unique (ignoring case): they name the output folders)",
        "products.csv:7: images: empty: every row needs at least one reference image",
        "products.csv:8: 3 fields, but the header names 5 columns (hint: give every column a field; an "
        "empty one is nothing between two commas)",
    ]


def test_the_mapping_and_the_scenes_are_checked_against_the_columns(make_project, monkeypatch) -> None:
    project = _project(make_project, CSV.replace("category", "kind"))
    monkeypatch.chdir(project)
    (project / "m.yaml").write_text((project / "m.yaml").read_text().replace("{{title}}", "{{colour}}"))
    problems = _problems("m.yaml")
    assert problems == [
        "m.yaml:7:10: subjects_from.class: products.csv has no column 'category' "
        "(hint: its columns: sku, kind, color, title, images)"
    ]
    (project / "m.yaml").write_text((project / "m.yaml").read_text().replace("category", "kind"))
    (project / "m.yaml").write_text((project / "m.yaml").read_text().replace("{title}", "{colour}"))
    assert _problems("m.yaml") == [
        "m.yaml:10:7: subjects_from.scenes[0]: unknown placeholder {colour}: products.csv has no such column "
        "(hint: known: {subject}, {class} and the columns sku, kind, color, title, images)"
    ]


@pytest.mark.parametrize("column", ["subject", "class"])
def test_a_column_named_like_a_built_in_placeholder_is_ambiguous(make_project, monkeypatch, column) -> None:
    """A feed with a `subject` column (and `name: sku`): `{subject}` is the sku, and the column's text never
    reached a prompt, without a word."""
    feed = CSV.replace("title,images", f"{column},images")
    project = _project(make_project, feed)
    monkeypatch.chdir(project)
    manifest = (project / "m.yaml").read_text().replace("{title}", f"{{{column}}}")
    (project / "m.yaml").write_text(manifest)
    mapped = "name" if column == "subject" else "class"
    problems = _problems("m.yaml")
    assert problems[0] == (
        f"m.yaml:10:7: subjects_from.scenes[0]: {{{column}}} is ambiguous: products.csv has a column "
        f"{column!r}, and {{{column}}} is the cell of the `{mapped}:` column (hint: map `{mapped}: {column}` "
        "in `subjects_from` if that column is meant, or rename it)"
    )
    assert len(problems) == (1 if column == "subject" else 2)  # scenes[1] uses {class} too
    if column == "class":  # mapped: the column is the placeholder's, as asked
        (project / "m.yaml").write_text(manifest.replace("class: category", "class: class"))
        assert (
            load_manifest("m.yaml").subjects[0].prompts[0].text
            == "a Porcelain teapot, 1 l in white, Porcelain teapot, 1 l"
        )


def test_a_missing_feed_and_an_unknown_format_are_located_in_the_manifest(make_project) -> None:
    project = _project(make_project, name="products.txt")
    assert _problems(project / "m.yaml") == [
        "{}:5:9: subjects_from.path: cannot tell the format of 'products.txt' from its name (hint: name a "
        ".csv, .jsonl or .parquet file, or set `format: csv|jsonl|parquet`)".format(project / "m.yaml")
    ]
    (project / "products.txt").rename(project / "other.csv")
    (project / "m.yaml").write_text((project / "m.yaml").read_text().replace("products.txt", "products.csv"))
    assert _problems(project / "m.yaml")[0].endswith(
        f"subjects_from.path: no such file: 'products.csv' (hint: paths are relative to the manifest's "
        f"folder {project})"
    )


def test_per_row_prompts_follow_the_scenes(make_project) -> None:
    feed = (
        "sku,category,color,title,images,extra\n"
        + "TP-1,teapot,white,T,images/teapot/00.jpg,a {class} in snow|a {class} in {color} rain\n"
    )
    project = _project(make_project, feed, extra="  prompts: extra\n")
    (subject,) = load_manifest(project / "m.yaml").subjects
    assert [p.text for p in subject.prompts] == [
        "a teapot in white, T",
        "a teapot on a table",
        "a teapot in snow",
        "a teapot in white rain",
    ]
    assert [list(p.seeds) for p in subject.prompts][2:] == [[0], [0]]  # the manifest's defaults


def test_jsonl_rows_are_located_at_their_lines_and_take_lists(make_project, monkeypatch) -> None:
    rows = [
        {
            "sku": "TP-1",
            "category": "teapot",
            "color": "white",
            "title": "T",
            "images": ["images/teapot/*.jpg"],
        },
        {"sku": 42, "category": "can", "color": "red", "title": "C", "images": "images/can/00.jpg"},
    ]
    text = "\n".join(json.dumps(row) for row in rows) + "\n\n{not json\n"
    project = _project(make_project, text, name="products.jsonl")
    monkeypatch.chdir(project)
    assert _problems(project / "m.yaml") == [
        "products.jsonl:4:2: not valid JSON: Expecting property name enclosed in double quotes"
    ]
    (project / "products.jsonl").write_text(text.rsplit("\n\n", 1)[0])
    loaded = load_manifest(project / "m.yaml")
    assert [(s.name, len(s.references)) for s in loaded.subjects] == [("TP-1", 3), ("42", 1)]


def test_parquet_feeds_are_read_with_pyarrow(make_project, monkeypatch) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    table = pyarrow.table(
        {
            "sku": ["TP-1", "CAN-3"],
            "category": ["teapot", "can"],
            "color": ["white", None],
            "title": ["T", "C"],
            "images": [["images/teapot/00.jpg"], ["images/can/*.jpg"]],
        }
    )
    project = _project(make_project, "", name="products.parquet")
    parquet.write_table(table, project / "products.parquet")
    monkeypatch.chdir(project)
    assert _problems(project / "m.yaml") == [
        "products.parquet: row 2: color: empty, but scenes[0] uses {color} (hint: fill it in)"
    ]
    (project / "m.yaml").write_text((project / "m.yaml").read_text().replace(" in {color},", ","))
    assert [s.name for s in load_manifest(project / "m.yaml").subjects] == ["TP-1", "CAN-3"]


def test_a_parquet_feed_of_no_columns_is_empty(make_project, monkeypatch) -> None:
    """An export script's empty table (`pandas.DataFrame().to_parquet(...)`): a traceback, `max() arg is an
    empty sequence`."""
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    project = _project(make_project, "", name="products.parquet")
    parquet.write_table(pyarrow.table({}), project / "products.parquet")
    monkeypatch.chdir(project)
    assert _problems("m.yaml") == [
        "products.parquet: the feed is empty (hint: export the products with a column per field)"
    ]


def test_a_parquet_feed_without_pyarrow_says_which_extra_to_install(make_project, monkeypatch) -> None:
    project = _project(make_project, "", name="products.parquet")
    monkeypatch.chdir(project)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert _problems(project / "m.yaml") == [
        "products.parquet: reading a Parquet feed needs pyarrow, which is not installed (hint: install the "
        "optional extra: pip install 'squeeze_cli[parquet]' (it adds pyarrow))"
    ]


def test_a_feed_without_rows_and_a_scene_key_the_pipeline_ignores_are_errors(
    make_project, monkeypatch
) -> None:
    project = _project(make_project, CSV.splitlines()[0] + "\n")
    monkeypatch.chdir(project)
    (project / "m.yaml").write_text(
        (project / "m.yaml").read_text().replace("      seeds: [1, 2]", "      guidance_scale: 3.0")
    )
    assert _problems("m.yaml") == [
        "m.yaml:5:9: subjects_from.path: products.csv has no rows "
        "(hint: one product per row, below the header)"
    ]
    (project / "products.csv").write_text(CSV)
    with pytest.raises(ManifestError) as error:
        load_manifest("m.yaml", recipe="tiny-qwen-image-edit")
    assert [p.field for p in error.value.problems] == ["subjects_from.scenes[1].guidance_scale"]


def test_the_documented_feed_example_is_valid(make_image, tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "manifest.md").read_text()
    section = text.split("### Subjects from a feed", 1)[1]
    mapping = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "products.csv").write_text(section.split("```csv\n", 1)[1].split("```", 1)[0])
    (tmp_path / "m.yaml").write_text("version: 1\nrecipe: tiny\n" + mapping)
    for photo in ("photos/mug-001/a.jpg", "photos/tp-002-front.jpg", "photos/tp-002-side.jpg"):
        make_image(photo)
    mug, teapot = load_manifest(tmp_path / "m.yaml").subjects
    assert [p.text for p in mug.prompts] == [
        "a mug in sage green on a marble kitchen counter, Stoneware mug 350 ml",
        "a mug on a white studio background",
    ]
    assert len(teapot.references) == 2 and teapot.prompts[-1].text == "a teapot on a tray"


def test_a_row_with_more_references_than_the_pipeline_takes_is_located_at_its_line(
    make_project, make_image, monkeypatch
) -> None:
    project = _project(make_project, CSV + "TP-9,teapot,white,T,extra/*.png\n")
    for index in range(4):
        make_image(f"extra/{index}.png", color=(index * 60, 0, 0))
    monkeypatch.chdir(project)
    with pytest.raises(ManifestError) as error:
        load_manifest("m.yaml", recipe="tiny-qwen-image-edit-2511")
    assert [str(p) for p in error.value.problems] == [
        "products.csv:4: images: 4 reference images, more than the 3 the qwen-image-edit-2511 pipeline "
        "(recipe tiny-qwen-image-edit-2511) conditions on (hint: keep at most 3 for this subject)"
    ]


def test_an_image_url_is_refused_as_a_url(make_project, monkeypatch) -> None:
    """Shop exports give photos as URLs: that said "no such file", relative to the feed's folder (and, with
    a `?` in the URL, "no file matches"), as if a local path were misspelt."""
    url = "https://cdn.shop.example/tp-1.jpg?width=800"
    project = _project(make_project, CSV.replace("images/teapot/00.jpg|images/teapot/01.jpg", url))
    monkeypatch.chdir(project)
    assert _problems("m.yaml") == [
        f"products.csv:2: images: {url!r} is a URL: squeeze reads local image files only (hint: download "
        f"the photos and give their paths; paths are relative to the feed's folder {project})"
    ]
    feed = "https://shop.example/export/products.csv"  # the feed itself, as a nightly script might name it
    (project / "m.yaml").write_text(
        (project / "m.yaml").read_text().replace("path: products.csv", f"path: {feed}")
    )
    assert _problems("m.yaml") == [
        f"m.yaml:5:9: subjects_from.path: {feed!r} is a URL: squeeze reads a local file (hint: download "
        "it first, e.g. `curl -fsS -o products.csv URL && squeeze gen ...`)"
    ]


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_feed_separated_by_semicolons_or_tabs_says_so(make_project, monkeypatch, separator: str) -> None:
    """A spreadsheet in a German or French locale saves "CSV" with semicolons: each mapped column was "not a
    column", the hint listing one column named 'sku;category;color;title;images'."""
    feed = "\n".join(
        line.replace(",", separator) for line in CSV.replace('"Porcelain teapot, 1 l"', "Teapot").splitlines()
    )
    project = _project(make_project, feed + "\n")
    monkeypatch.chdir(project)
    assert _problems("m.yaml") == [
        f"products.csv:1: the header is one column, {CSV.splitlines()[0].replace(',', separator)!r}: the "
        f"feed's fields are separated by {separator!r}, not commas (hint: export it comma-separated (CSV "
        "UTF-8 in a spreadsheet))"
    ]


def test_a_json_object_in_a_used_column_is_an_error_not_its_repr(make_project, monkeypatch) -> None:
    """A product export nests: a title per language, the photos as `[{"src": ...}]`. The title went into
    the prompt as Python's repr, "a teapot in white, {'en': 'Teapot', ...}", and the photos were "no such
    file: \"{'src': ...}\""."""
    rows = [
        {
            "sku": "TP-1",
            "category": "teapot",
            "color": "white",
            "title": {"en": "Teapot", "de": "Teekanne"},
            "images": [{"src": "images/teapot/00.jpg"}],
            "attributes": {"unused": True},  # a column no scene uses is no problem
        },
        {
            "sku": "TP-2",
            "category": "teapot",
            "color": "white",
            "title": "T",
            "images": "images/teapot/01.jpg",
        },
    ]
    project = _project(make_project, "".join(json.dumps(row) + "\n" for row in rows), name="products.jsonl")
    monkeypatch.chdir(project)
    hint = "(hint: give the column text, or a list of texts: one language's title, the photos' paths)"
    assert _problems("m.yaml") == [
        f"products.jsonl:1: images: holds an object, not text {hint}",
        f"products.jsonl:1: title: holds an object, not text {hint}",
    ]


def test_a_row_that_is_not_valid_csv_is_located_where_it_starts_and_the_rest_is_read(
    make_project, monkeypatch
) -> None:
    """A title with an inch mark (`"12" pan`) stopped the reading of the feed there, without a hint, and an
    unclosed quote was reported at the feed's last line, not at the row that opens it."""
    feed = (
        CSV
        + 'TP-4,teapot,white,"12" pan,images/teapot/00.jpg\n'  # line 4
        + "CAN-5,can,red,Can,images/can/missing.jpg\n"  # line 5: still read and checked
        + 'CAN-6,can,red,"Can 33 cl,images/can/00.jpg\n'  # line 6: the quote is never closed
        + "CAN-7,can,red,Can,images/can/00.jpg\n"
    )
    project = _project(make_project, feed)
    monkeypatch.chdir(project)
    hint = '(hint: quote a field that holds a quote, and double its quotes: "12"" pan")'
    assert _problems("m.yaml") == [
        f"products.csv:4: not valid CSV: ',' expected after '\"' {hint}",
        "products.csv:5: images: no such file: 'images/can/missing.jpg' "
        f"(hint: paths are relative to the feed's folder {project})",
        f"products.csv:6: not valid CSV: unexpected end of data {hint}",
    ]


def test_a_windows_path_gets_a_hint_to_write_slashes(make_project, monkeypatch) -> None:
    """A feed exported on Windows names `images\\teapot\\00.jpg`: "no such file", with a hint about the
    feed's folder, for a file that is there."""
    project = _project(
        make_project, CSV.replace("images/teapot/00.jpg|images/teapot/01.jpg", "images\\teapot\\00.jpg")
    )
    monkeypatch.chdir(project)
    assert _problems("m.yaml") == [
        "products.csv:2: images: no such file: 'images\\\\teapot\\\\00.jpg' (hint: write the path with `/`: "
        "here `\\` is part of a file's name, not a folder separator)"
    ]


def test_a_spreadsheets_trailing_empty_columns_are_no_columns(make_project, monkeypatch) -> None:
    """A spreadsheet exports formatted but empty columns after the last one (`images,,`): the whole feed
    was refused, "a column has no name"."""
    rows = [f"{line},," for line in CSV.splitlines()]
    project = _project(make_project, "\n".join(rows) + "\nCAN-3,can,red,Can,images/can/00.jpg,,stray\n")
    monkeypatch.chdir(project)
    assert _problems("m.yaml") == [
        "products.csv:4: 7 fields, but the header names 5 columns "
        '(hint: quote a field that holds a comma: "a, b")'
    ]
    (project / "products.csv").write_text("\n".join(rows) + "\n")
    assert [s.name for s in load_manifest("m.yaml").subjects] == ["TP-1", "BP-2"]
    (project / "products.csv").write_text(CSV.replace("color,", ",", 1))  # a column within has no name
    assert _problems("m.yaml")[0].startswith("products.csv:1: a column has no name")


@pytest.mark.parametrize("feed", ["\n", "\r\n\r\n", " , ,\n"])
def test_a_feed_of_blank_lines_is_empty(make_project, monkeypatch, feed: str) -> None:
    """An export that failed and left a newline: `validate` and `gen` died with a traceback (`max() arg is
    an empty sequence`), the blank line taken for a header of no columns."""
    project = _project(make_project, feed)
    monkeypatch.chdir(project)
    assert _problems("m.yaml") == ["products.csv: the feed is empty (hint: a header row first)"]


def test_blank_lines_before_the_header_are_skipped(make_project, monkeypatch) -> None:
    """Each row was "5 fields, but the header names 0 columns": the first blank line was the header."""
    project = _project(make_project, "\n\n" + CSV)
    monkeypatch.chdir(project)
    assert [s.name for s in load_manifest("m.yaml").subjects] == ["TP-1", "BP-2"]
    (project / "products.csv").write_text("\n\n" + CSV + "CAN-3,can,red,Can,images/can/missing.jpg\n")
    assert _problems("m.yaml")[0].startswith("products.csv:6: images: no such file")


def test_a_photo_named_in_another_unicode_form_is_pointed_at(make_project, make_image, monkeypatch) -> None:
    """A photo copied from a Mac is named in NFD (`e` + a combining accent), the shop's export writes NFC
    (`é`): the same name on screen, two names on Linux, and "no such file" said nothing more."""
    import unicodedata

    make_image(unicodedata.normalize("NFD", "photos/café.jpg"))
    project = _project(
        make_project, CSV.replace("images/teapot/00.jpg|images/teapot/01.jpg", "photos/café.jpg")
    )
    monkeypatch.chdir(project)
    problems = _problems("m.yaml")
    assert problems == [
        "products.csv:2: images: no such file: 'photos/café.jpg' (hint: its folder has 'cafe\\u0301.jpg', "
        "the same name in another Unicode form: rename the file, or write the path as it is)"
    ]


def test_a_feed_over_the_job_limit_is_located_at_subjects_from(make_project, monkeypatch) -> None:
    """A 100,001-row feed was "m.yaml:1:1: subjects: the manifest plans ... jobs", at a key the manifest
    does not have."""
    project = _project(make_project)
    monkeypatch.chdir(project)
    with pytest.raises(ManifestError) as error:
        load_manifest("m.yaml", max_jobs=5)
    assert [str(problem) for problem in error.value.problems] == [
        "m.yaml:5:3: subjects_from: the manifest plans 6 jobs, more than the limit of 5 (hint: raise it with "
        "`--max-jobs N` or `max_jobs: N` if that many images is intended)"
    ]
