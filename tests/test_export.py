"""`squeeze export` on a tiny evaluated run: each format loads with the real `datasets` loader, selection,
splits by subject, the dataset card, incremental and crash-safe reruns, and the errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from support import EXAMPLE_IMAGES, deadline, gen_example_run, one_error_line

MANIFEST = """\
version: 1
recipe: tiny
output:
  views_dir: .views
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: [0, 1]
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts:
      - a {class} in the snow
      - a {class} on the beach
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts:
      - a {class} on a table
  - name: cat
    class: cat
    references: [images/cat/*.jpg]
    prompts:
      - a {class} on a sofa
"""
NUM_IMAGES = 8


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, squeeze) -> Path:
    """One tiny `squeeze gen` run scored by `squeeze eval --metrics tiny`, made once."""
    run = gen_example_run(tmp_path_factory.mktemp("project"), squeeze, MANIFEST)
    result = squeeze("eval", str(run), "--metrics", "tiny", "--json")
    assert result.code == 0, result.err
    return run


@pytest.fixture
def run(made_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "run"
    shutil.copytree(made_run, copy)
    return copy


def export(squeeze, run: Path, folder: Path, *args: str, expect: int = 0):
    result = squeeze("export", str(run), "-o", str(folder), *args)
    assert result.code == expect, (result.out, result.err)
    return result


def load(builder: str, folder: Path, cache: Path):
    import datasets

    datasets.utils.logging.disable_progress_bar()
    return datasets.load_dataset(builder, data_dir=str(folder), cache_dir=str(cache))


def prompts_of(run: Path) -> dict[str, str]:
    """`{job_id: prompt}` of the run's finished images, from its index."""
    lines = [json.loads(line) for line in (run / "index.jsonl").read_text().splitlines()]
    return {line["job_id"]: line["prompt"] for line in lines if line["status"] == "ok"}


@pytest.mark.parametrize("export_format", ["imagefolder", "parquet"])
def test_each_format_loads_with_datasets_one_row_per_image(squeeze, run, tmp_path, export_format):
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", export_format)
    dataset = load(export_format, folder, tmp_path / "cache")
    train = dataset["train"]
    assert train.num_rows == NUM_IMAGES
    assert {row["job_id"]: row["prompt"] for row in train} == prompts_of(run)
    row = train[0]
    assert row["image"].size == (32, 32)
    assert row["recipe"] == "tiny" and row["class"] in {"dog", "backpack", "cat"}
    assert isinstance(row["dino"], float) and isinstance(row["clip_t"], float)
    assert all(Path(path).is_file() for path in row["references"])
    assert row["license"] == "none (random weights)" and row["variants"] is None  # the tiny recipe's


def test_webdataset_loads_with_its_captions(squeeze, run, tmp_path):
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", "webdataset")
    train = load("webdataset", folder, tmp_path / "cache")["train"]
    assert train.num_rows == NUM_IMAGES
    assert {row["__key__"]: row["txt"] for row in train} == prompts_of(run)
    assert {row["json"]["subject"] for row in train} == {"dog", "backpack", "cat"}


def test_references_as_images(squeeze, run, tmp_path):
    for export_format in ("imagefolder", "parquet"):
        folder = tmp_path / export_format
        export(squeeze, run, folder, "--format", export_format, "--with-references")
        train = load(export_format, folder, tmp_path / "cache")["train"]
        dogs = [row for row in train if row["subject"] == "dog"]
        assert len(dogs[0]["references"]) == len(list((EXAMPLE_IMAGES / "dog").glob("*.jpg")))
        assert all(reference.size[0] > 0 for reference in dogs[0]["references"])


def test_where_subjects_and_split(squeeze, run, tmp_path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    threshold = sorted(row["dino"] for row in rows)[3]
    folder = tmp_path / "export"
    result = export(
        squeeze, run, folder, "--format", "parquet", "--where", f"dino >= {threshold} and seed != 7"
    )
    kept = {row["job_id"] for row in rows if row["dino"] >= threshold}
    train = load("parquet", folder, tmp_path / "cache")["train"]
    assert {row["job_id"] for row in train} == kept
    assert f"{len(kept)} new images" in result.out
    card = (folder / "README.md").read_text()
    assert f"dino >= {threshold}" in card

    folder = tmp_path / "dogs"
    export(squeeze, run, folder, "--subjects", "d*")
    assert {row["subject"] for row in load("imagefolder", folder, tmp_path / "cache")["train"]} == {"dog"}

    splits = {}
    for attempt in range(2):  # the same seed gives the same split
        folder = tmp_path / f"split{attempt}"
        export(squeeze, run, folder, "--format", "parquet", "--split", "val=0.3", "--seed", "3")
        dataset = load("parquet", folder, tmp_path / "cache")
        splits[attempt] = {name: {row["subject"] for row in dataset[name]} for name in dataset}
    assert splits[0] == splits[1]
    assert set(splits[0]) == {"train", "validation"}
    assert not splits[0]["train"] & splits[0]["validation"]
    assert len(splits[0]["validation"]) == 1

    # The subjects --subjects keeps are split (they were split among all the run's, so that one seed put
    # every dog into validation and another none).
    for seed in range(4):
        folder = tmp_path / f"dogs-and-cats{seed}"
        export(squeeze, run, folder, "--subjects", "[dc]*", "--split", "val=0.3", "--seed", str(seed))
        dataset = load("imagefolder", folder, tmp_path / "cache")
        assert [len({row["subject"] for row in dataset[name]}) for name in ("train", "validation")] == [1, 1]
    result = export(squeeze, run, tmp_path / "dogs", "--subjects", "dog", "--split", "val=0.3", expect=2)
    assert "the splits take val 1 of the 1 subject exported, leaving none for train" in result.err


def test_dataset_card_has_the_hub_header(squeeze, run, tmp_path):
    import yaml

    folder = tmp_path / "export"
    export(squeeze, run, folder)
    text = (folder / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["size_categories"] == ["n<1K"]
    assert "text-to-image" in header["task_categories"]
    assert header["license"] == "other"
    assert "squeeze " in text and "reference_size: 32" in text  # the version, the resolved manifest


def test_the_card_fences_a_manifest_that_holds_backticks(squeeze, run, tmp_path):
    """A prompt may hold ```: the card's fence around the manifest ended there, the rest read as Markdown."""
    with open(run / "manifest.resolved.yaml", "a") as manifest:
        manifest.write("# a prompt may hold ``` or ````\n")
    folder = tmp_path / "export"
    export(squeeze, run, folder)
    card = (folder / "README.md").read_text()
    fenced = card.split("`````yaml\n")[1].split("\n`````\n")[0]
    assert fenced == (run / "manifest.resolved.yaml").read_text().rstrip()


def grow(squeeze, run: Path, made_run: Path, tmp_path: Path) -> None:
    """Add a third seed to every prompt of `run`: 4 new images."""
    grown = (made_run.parent / "m.yaml").read_text().replace("seeds: [0, 1]", "seeds: [0, 1, 2]")
    (tmp_path / "grown.yaml").write_text(grown)
    shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
    result = squeeze("gen", str(tmp_path / "grown.yaml"), "--out", str(run), "--quiet")
    assert result.code == 0, result.err


def test_a_rerun_adds_only_new_images(squeeze, run, tmp_path, made_run):
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", "parquet")
    first = sorted(path.name for path in (folder / "data").iterdir())
    result = export(squeeze, run, folder, "--format", "parquet")
    assert "exported 0 new images" in result.out
    assert sorted(path.name for path in (folder / "data").iterdir()) == first
    grow(squeeze, run, made_run, tmp_path)
    result = export(squeeze, run, folder, "--format", "parquet")
    assert "exported 4 new images" in result.out
    train = load("parquet", folder, tmp_path / "cache")["train"]
    assert train.num_rows == NUM_IMAGES + 4
    assert len(set(train["job_id"])) == NUM_IMAGES + 4


@pytest.mark.parametrize("export_format", ["imagefolder", "webdataset"])
def test_a_killed_export_leaves_the_previous_one_whole(
    squeeze, run, tmp_path, made_run, monkeypatch, export_format
):
    from squeeze_cli.export import formats
    from squeeze_cli.export.folder import export_run

    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", export_format)
    before = sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
    grow(squeeze, run, made_run, tmp_path)
    writer = formats.ImageFolderPart if export_format == "imagefolder" else formats.WebDatasetPart
    add = writer.add
    added = []

    def killed_after_two(self, png, row):
        if len(added) == 2:
            raise KeyboardInterrupt  # as a kill in the middle of a part
        added.append(row["job_id"])
        add(self, png, row)

    monkeypatch.setattr(writer, "add", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        export_run(run, folder, export_format=export_format)
    assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) == before
    assert load(export_format, folder, tmp_path / "cache")["train"].num_rows == NUM_IMAGES
    monkeypatch.undo()
    export(squeeze, run, folder, "--format", export_format)
    assert load(export_format, folder, tmp_path / "cache2")["train"].num_rows == NUM_IMAGES + 4


def test_a_part_renamed_before_the_state_was_saved_is_written_again(squeeze, run, tmp_path):
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", "parquet", "--subjects", "dog")
    state = json.loads((folder / ".squeeze-export.json").read_text())
    orphan = folder / "data" / "train-00007.parquet"
    shutil.copyfile(folder / "data" / "train-00000.parquet", orphan)  # a kill after the rename
    export(squeeze, run, folder, "--format", "parquet", "--subjects", "dog")
    assert not orphan.exists()
    assert json.loads((folder / ".squeeze-export.json").read_text()) == state


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--where", "dino >="], "--where 'dino >=': column"),
        (["--where", "dinoo > 1"], "column 1: unknown field `dinoo`"),
        (["--where", "class == 'x' and clas == 'dog'"], "column 18: unknown field `clas`"),
        (
            ["--where", "subject > 1"],
            "compares a number with text (hint: compare a number field with a number",
        ),
        (["--where", "__import__('os')"], "is not a condition"),
        (["--where", "dino + 1 > 2"], "is not a field or a constant"),
        (["--format", "csv"], "--format csv: expected one of"),
        (["--split", "holdout=0.1"], "unknown split 'holdout'"),
        (["--split", "val=2"], "0 < FRACTION < 1"),
        (["--split", "val=0.9"], "the splits take val 3 of the 3 subjects exported, leaving none for train"),
        (["--split", "val=0.1", "--split", "test=0.5"], "take val 1, test 2 of the 3 subjects exported"),
        (["--split", "val=0.1", "--split", "validation=0.1"], "`val` and `validation` are one split"),
        (["--where", "not " * 1000 + "dino > 1"], "nested more than 100 deep"),
        (["--where", "dino > " + "-" * 150 + "1"], "nested more than 100 deep"),
        (["--subjects", "zebra*"], "no subject of the run matches"),
        (["--format", "webdataset", "--with-references"], "--with-references"),
    ],
)
def test_bad_flags_are_one_line_errors(squeeze, made_run, tmp_path, args, message):
    result = export(squeeze, made_run, tmp_path / "export", *args, expect=2)
    assert message in one_error_line(result.err)
    assert not (tmp_path / "export").exists()


def test_filtering_on_scores_of_a_run_never_evaluated_says_to_run_eval(squeeze, made_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    (run / "metrics.jsonl").unlink()
    result = export(squeeze, run, tmp_path / "export", "--where", "dino >= 0.6", expect=2)
    assert "column 1: no field `dino` in this run (hint: run `squeeze eval" in one_error_line(result.err)


def test_the_folder_of_several_recipes_hints_at_one_of_its_runs(squeeze, run, tmp_path):
    """`gen --recipe A,B` writes OUT/A/ and OUT/B/, which `status` and `eval` take whole: `export OUT`
    names one of them to give instead of saying to give a run folder."""
    result = export(squeeze, run.parent, tmp_path / "export", expect=2)
    assert f"(hint: give one of the runs in it, e.g. {run})" in one_error_line(result.err)


def test_other_folders_are_refused(squeeze, made_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert "holds other files" in export(squeeze, made_run, taken, expect=2).err
    assert "inside the run folder" in export(squeeze, made_run, made_run / "x", expect=2).err
    assert "not a squeeze run folder" in export(squeeze, taken, tmp_path / "e", expect=2).err
    folder = tmp_path / "export"
    export(squeeze, made_run, folder)
    assert "another --where" in export(squeeze, made_run, folder, "--where", "seed == 0", expect=2).err
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    (run / "metrics.jsonl").unlink()
    export(squeeze, run, tmp_path / "unscored")
    shutil.copyfile(made_run / "metrics.jsonl", run / "metrics.jsonl")  # `squeeze eval` since
    error = one_error_line(export(squeeze, run, tmp_path / "unscored", expect=2).err)
    assert "another set of eval scores (hint: the run's `squeeze eval` scores changed since" in error


def test_a_rerun_compares_the_splits_in_order_and_the_seed_only_with_splits(squeeze, made_run, tmp_path):
    """The splits take their subjects in the order given, so the reverse order would place new subjects
    otherwise: it was taken as the same export. A --seed without --split shuffles nothing: it was refused."""
    folder = tmp_path / "split"
    export(squeeze, made_run, folder, "--split", "val=0.3", "--split", "test=0.3")
    reverse = export(squeeze, made_run, folder, "--split", "test=0.3", "--split", "val=0.3", expect=2)
    assert "holds an export made with another --split" in one_error_line(reverse.err)
    export(squeeze, made_run, folder, "--split", "val=0.3", "--split", "test=0.3")  # the same: nothing new
    plain = tmp_path / "plain"
    export(squeeze, made_run, plain)
    export(squeeze, made_run, plain, "--seed", "5")


def test_grids_and_contact_sheets_are_never_exported(squeeze, run, tmp_path):
    for view in run.glob(".views/*/*.png"):  # as a run without `output.views_dir` draws them
        view.rename(run / view.parent.name / view.name)
    assert list(run.glob("*/grid-*.png")) and list(run.glob("*/contact-sheet*.png"))
    folder = tmp_path / "export"
    export(squeeze, run, folder)
    assert load("imagefolder", folder, tmp_path / "cache")["train"].num_rows == NUM_IMAGES
    names = [path.name for path in folder.rglob("*.png")]
    assert len(names) == NUM_IMAGES and not [name for name in names if "grid" in name or "contact" in name]


def test_the_run_folder_itself_loads_as_its_images_only(squeeze, made_run, tmp_path):
    # output.views_dir: .views keeps grids and contact sheets out of the subject folders
    assert list(made_run.glob("*/grid-*.png")) == []
    assert list((made_run / ".views").glob("*/grid-*.png"))
    train = load("imagefolder", made_run, tmp_path / "cache")["train"]
    assert train.num_rows == NUM_IMAGES


@pytest.mark.parametrize("export_format", ["imagefolder", "parquet", "webdataset"])
def test_training_reads_an_export_as_subject_pairs(squeeze, run, tmp_path, export_format):
    from squeeze_cli.train.exported import load_export_data

    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", export_format, "--split", "val=0.3")
    data = load_export_data(folder, "train", "config.yaml")
    prompts = prompts_of(run)
    assert 0 < len(data) < NUM_IMAGES
    for index in range(len(data)):
        sample = data.load(index)
        assert sample.instruction == prompts[sample.id]
        assert sample.target.size == (32, 32) and sample.references
    assert len(load_export_data(folder, "validation", "config.yaml")) == NUM_IMAGES - len(data)
    # `--split val` is `validation` to `datasets`; a config names it as export did
    assert len(load_export_data(folder, "val", "config.yaml")) == NUM_IMAGES - len(data)


@pytest.mark.parametrize("export_format", ["imagefolder", "webdataset"])
def test_training_refuses_an_export_whose_reference_photos_are_gone(
    squeeze, made_run, tmp_path, export_format
):
    """An export without --with-references names the photos where gen read them; only row 0 was tried, so a
    later subject's photos moved away stopped the training at its first batch with a traceback."""
    from squeeze_cli.errors import ManifestError
    from squeeze_cli.train.exported import load_export_data

    folder = tmp_path / "export"
    export(squeeze, made_run, folder, "--format", export_format)
    photos = made_run.parent / "images" / "cat"
    photos.rename(tmp_path / "moved")
    try:
        with pytest.raises(ManifestError) as raised:
            load_export_data(folder, "train", "config.yaml")
    finally:
        (tmp_path / "moved").rename(photos)
    problems = raised.value.problems
    assert {problem.field for problem in problems} == {"data.path"}
    assert [problem.message.split(": ")[0] for problem in problems] == [
        f"the export's reference {path}" for path in sorted(str(p) for p in photos.glob("*.jpg"))
    ]
    assert "No such file" in problems[0].message and "--with-references" in str(problems[0].hint)


@pytest.mark.parametrize(
    "state",
    ["[" * 100_000, '{"selection": {"format": "some-user/some-hub-dataset"}}', "link", "fifo", "parts"],
    ids=["deep", "hub-name", "link", "fifo", "damaged-for-export"],
)
def test_training_reads_a_damaged_export_state_as_one_problem(squeeze, run, tmp_path, state):
    """Training read the export's state with `read_text` (through a link, blocking on a FIFO, a
    RecursionError on deep JSON), and handed its `format` to `datasets.load_dataset`, which takes a hub
    dataset's name too. A state export itself calls damaged is damaged for training too."""
    import os

    from squeeze_cli.errors import ManifestError
    from squeeze_cli.train.exported import load_export_data

    folder = tmp_path / "export"
    export(squeeze, run, folder)
    path = folder / ".squeeze-export.json"
    whole = json.loads(path.read_text())
    path.unlink()
    if state == "parts":
        path.write_text(json.dumps(whole | {"parts": 5}))
    elif state == "link":
        (tmp_path / "elsewhere.json").write_text('{"selection": {"format": "parquet"}}')
        path.symlink_to(tmp_path / "elsewhere.json")
    elif state == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(state)
    with pytest.raises(ManifestError, match="cannot read the squeeze export"):
        load_export_data(folder, "train", "config.yaml")


KONTEXT_MANIFEST = """\
version: 1
recipe: tiny-kontext
defaults:
  seeds: [0, 1, 2]
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts: ["a {class} in the snow", "a {class} on the beach"]
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts: ["a {class} on a table"]
"""


@pytest.mark.slow
def test_render_score_filter_train_and_render_again(squeeze, tmp_path):
    """The loop of docs/datasets.md on tiny models: gen with a baseline recipe, score, keep the pairs that
    hold identity, train on them, and gen with the trained recipe."""
    shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
    (tmp_path / "pairs.yaml").write_text(KONTEXT_MANIFEST)
    run = tmp_path / "pairs"
    assert squeeze("gen", str(tmp_path / "pairs.yaml"), "--out", str(run), "--quiet").code == 0
    assert squeeze("eval", str(run), "--metrics", "tiny", "--json").code == 0
    scores = sorted(json.loads(line)["dino"] for line in (run / "metrics.jsonl").read_text().splitlines())
    threshold = scores[len(scores) // 2]
    folder = tmp_path / "dataset"
    export(squeeze, run, folder, "--format", "parquet", "--where", f"dino >= {threshold}")
    kept = sum(score >= threshold for score in scores)
    assert load("parquet", folder, tmp_path / "cache")["train"].num_rows == kept

    trained = tmp_path / "trained"
    data = f"data={{format: hf, path: {folder}}}"
    result = squeeze("train", "tiny", "--no-progress", "--set", data, "--set", f"output_dir={trained}")
    assert result.code == 0, result.err
    assert json.loads((trained / "training.json").read_text())["data"].startswith(f"{kept} samples from ")

    (tmp_path / "again.yaml").write_text(MANIFEST.replace("output:\n  views_dir: .views\n", ""))
    again = tmp_path / "again"
    result = squeeze(
        "gen",
        str(tmp_path / "again.yaml"),
        "--recipe",
        str(trained / "recipe.yaml"),
        "--out",
        str(again),
        "--quiet",
    )
    assert result.code == 0, result.err
    assert len(list(again.glob("*/*.png"))) >= NUM_IMAGES


def test_stale_images_are_never_exported(squeeze, run, tmp_path, made_run):
    # The cat is removed from the manifest: its images stay in the run folder, stale, and are left out.
    manifest = (made_run.parent / "m.yaml").read_text()
    (tmp_path / "no-cat.yaml").write_text(manifest[: manifest.index("  - name: cat")])
    shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
    assert squeeze("gen", str(tmp_path / "no-cat.yaml"), "--out", str(run), "--quiet").code == 0
    assert list((run / "cat").glob("*.png"))
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", "parquet")
    train = load("parquet", folder, tmp_path / "cache")["train"]
    assert train.num_rows == NUM_IMAGES - 2 and "cat" not in set(train["subject"])


def test_imagefolder_links_the_images(squeeze, made_run, tmp_path):
    folder = tmp_path / "export"
    export(squeeze, made_run, folder)
    exported = {path.stat().st_ino for path in folder.glob("train/part-00000/*/*.png")}
    assert len(exported) == NUM_IMAGES
    assert exported == {path.stat().st_ino for path in made_run.glob("*/*.png")}  # one file, two names


def test_imagefolder_loads_whatever_the_subjects_and_photos_are_named(squeeze, tmp_path):
    """`datasets` reads a split from any folder or file name in the path holding `test`, `dev`, `eval`,
    `val`, ...: a subject (or a reference photo) so named made the imagefolder export fail to load."""
    photos = tmp_path / "images"
    photos.mkdir()
    shutil.copyfile(EXAMPLE_IMAGES / "dog" / "00.jpg", photos / "test-front.jpg")
    shutil.copyfile(EXAMPLE_IMAGES / "cat" / "00.jpg", photos / "eval.jpg")
    manifest = (
        MANIFEST.replace("name: dog", "name: dev-board")
        .replace("name: cat", "name: cat-eval")
        .replace("images/dog/*.jpg", "images/test-front.jpg")
        .replace("images/cat/*.jpg", "images/eval.jpg")
        .replace("images/backpack/00.jpg", "images/eval.jpg")
    )
    (tmp_path / "m.yaml").write_text(manifest)
    run = tmp_path / "run"
    assert squeeze("gen", str(tmp_path / "m.yaml"), "--out", str(run), "--quiet").code == 0
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--with-references", "--split", "val=0.3")
    dataset = load("imagefolder", folder, tmp_path / "cache")
    assert sorted(dataset) == ["train", "validation"]
    assert sum(split.num_rows for split in dataset.values()) == NUM_IMAGES
    subjects = [{row["subject"] for row in split} for split in dataset.values()]
    assert set.union(*subjects) == {"dev-board", "backpack", "cat-eval"} and not set.intersection(*subjects)
    assert all(len(row["references"]) == 1 for split in dataset.values() for row in split)


def test_where_language():
    from squeeze_cli.export.where import WhereError, parse_where

    fields = {"dino": "number", "seed": "number", "subject": "text", "class": "text"}
    rows = [
        {"dino": 0.7, "seed": 0, "subject": "dog", "class": "dog"},
        {"dino": 0.5, "seed": 1, "subject": "cat", "class": "cat"},
        {"dino": None, "seed": 2, "subject": "dog", "class": "dog"},  # not scored
    ]

    def kept(text: str) -> list[int]:
        keep = parse_where(text, fields)
        return [row["seed"] for row in rows if keep(row)]

    assert kept("dino >= 0.6") == [0]
    assert kept("dino < 0.6") == [1]  # a missing score is neither above nor below
    assert kept("not dino >= 0.6") == [1, 2]
    assert kept("dino == null") == [2]
    assert kept("0.4 < dino <= 0.7 and subject != 'cat'") == [0]
    assert kept("subject == 'cat' or seed >= 2") == [1, 2]
    assert kept("seed > -1 and (dino >= 0.6 or dino == null)") == [0, 2]
    assert kept("class == 'cat' or subject == 'class'") == [1]  # `class`, a Python keyword, is a field
    assert kept("(seed == 2 or\n class == 'cat')") == [1, 2]  # on any line
    for bad in ("dino >= 0.6 and", "dino", "dino > 1j", "dino in (1, 2)", "dino > seed + 1", "subject < 1"):
        with pytest.raises(WhereError, match="--where"):
            parse_where(bad, fields)


@pytest.mark.parametrize(
    ("name", "ok"), [(".views", True), ("__views", True), ("views", False), (".stale", False)]
)
def test_views_dir_names(squeeze, make_project, name, ok):
    project = make_project(m=MANIFEST)
    result = squeeze("validate", str(project / "m.yaml"), "--set", f"output.views_dir={name}")
    assert result.code == (0 if ok else 2), result.err
    if not ok:
        assert "output.views_dir" in result.err and "is not a folder name for the views" in result.err


def test_licence_and_variants_come_from_the_sidecars(squeeze, run, tmp_path):
    for sidecar in run.glob("*/*.json"):
        record = json.loads(sidecar.read_text())
        record["license"] = {"name": "Apache-2.0", "commercial_use": True, "url": None}
        record["variants"] = {"amazon": {"file": f"{sidecar.parent.name}/variants/amazon/{sidecar.stem}.jpg"}}
        sidecar.write_text(json.dumps(record))
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", "parquet", "--where", "license == 'Apache-2.0'")
    train = load("parquet", folder, tmp_path / "cache")["train"]
    assert train.num_rows == NUM_IMAGES
    row = train[0]
    stem = f"{row['prompt_index']:03d}-s{row['seed']}"
    assert json.loads(row["variants"]) == {"amazon": {"file": f"{row['subject']}/variants/amazon/{stem}.jpg"}}


@pytest.mark.parametrize(
    ("license_", "header"),
    [
        ({"name": "Apache-2.0", "commercial_use": True}, {"license": "apache-2.0"}),
        (
            {
                "name": "FLUX.1 [dev] Non-Commercial License",
                "commercial_use": False,
                "url": "https://x/LICENSE.md",
            },
            {
                "license": "other",
                "license_name": "flux-1-dev-non-commercial-license",
                "license_link": "https://x/LICENSE.md",
            },
        ),
        ({"name": "unknown", "commercial_use": None}, {"license": "other"}),
    ],
)
def test_the_card_carries_the_recipe_licence(license_, header):
    from squeeze_cli.export.card import license_header
    from squeeze_cli.manifest.recipes import License

    assert license_header(License(**license_)) == header


def test_a_full_disk_is_one_line_and_keeps_the_previous_export(squeeze, run, tmp_path, made_run, monkeypatch):
    import errno

    from squeeze_cli.export import formats

    folder = tmp_path / "export"
    export(squeeze, run, folder, "--format", "parquet")
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    grow(squeeze, run, made_run, tmp_path)

    def full(self, png, row):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.rows.path))

    monkeypatch.setattr(formats.ParquetPart, "add", full)
    result = export(squeeze, run, folder, "--format", "parquet", expect=1)
    assert "No space left on device" in one_error_line(result.err)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("export_format", ["imagefolder", "parquet"])
def test_a_first_export_killed_after_renaming_a_part_is_finished_by_the_next(
    squeeze, made_run, tmp_path, monkeypatch, export_format
):
    """The first export saved its state only after its parts: killed after a part's rename, it left a
    folder of parts and no state, which every later export refused as "other files". An export that holds
    no part yet takes other options (the user stopped it to change them)."""
    from squeeze_cli.export.folder import export_run

    rename = os.rename

    def killed_after_rename(source, target):
        rename(source, target)
        raise KeyboardInterrupt  # as a kill -9 right after the rename

    folder = tmp_path / "export"
    monkeypatch.setattr(os, "rename", killed_after_rename)
    with pytest.raises(KeyboardInterrupt):
        export_run(made_run, folder, export_format=export_format, where="seed >= 0")
    monkeypatch.undo()
    assert list(folder.glob("*/part-*") if export_format == "imagefolder" else folder.glob("data/*"))
    result = export(squeeze, made_run, folder, "--format", export_format, "--split", "val=0.3")
    assert f"exported {NUM_IMAGES} new images" in result.out
    dataset = load(export_format, folder, tmp_path / "cache")
    job_ids = [job_id for split in dataset.values() for job_id in split["job_id"]]
    assert sorted(job_ids) == sorted(prompts_of(made_run))  # each image once


def test_a_card_the_kill_left_behind_is_written_again(squeeze, run, tmp_path, made_run, monkeypatch):
    """Killed after saving its state and before its card, an export left the previous card; a rerun with
    nothing new wrote nothing, so the card went on counting the images of the export before."""
    from squeeze_cli import outputs
    from squeeze_cli.export.folder import export_run

    folder = tmp_path / "export"
    export(squeeze, run, folder)
    grow(squeeze, run, made_run, tmp_path)
    write_text = outputs.atomic_write_text

    def killed_at_the_card(path, text):
        if Path(path).name == "README.md":
            raise KeyboardInterrupt
        write_text(path, text)

    monkeypatch.setattr(outputs, "atomic_write_text", killed_at_the_card)
    with pytest.raises(KeyboardInterrupt):
        export_run(run, folder, export_format="imagefolder")
    monkeypatch.undo()
    assert f"{NUM_IMAGES} images of 3 subjects" in (folder / "README.md").read_text()
    assert "exported 0 new images" in export(squeeze, run, folder).out
    card = (folder / "README.md").read_text()
    assert f"{NUM_IMAGES + 4} images of 3 subjects" in card and f"train: {NUM_IMAGES + 4}" in card
    stamp = (folder / "README.md").stat().st_mtime_ns
    export(squeeze, run, folder)
    assert (folder / "README.md").stat().st_mtime_ns == stamp  # nothing new, the card right: not written


def test_the_temporary_files_of_a_killed_export_are_removed(squeeze, made_run, tmp_path):
    """A kill in the middle of writing the state or the card leaves `.<name>.<pid>.tmp`: beside the first
    state, the folder was refused as "other files"; beside an export, it stayed (and went to the Hub)."""
    folder = tmp_path / "export"
    folder.mkdir()
    dead = 99_999_999  # above any pid_max: no such process
    (folder / f"..squeeze-export.json.{dead}.tmp").write_text('{"format": 1, "sel')
    export(squeeze, made_run, folder)
    (folder / f".README.md.{dead}.tmp").write_text("---\nlicen")
    export(squeeze, made_run, folder)
    assert not list(folder.glob("*.tmp"))


def test_a_metrics_line_that_is_not_utf8_is_one_line(squeeze, run, tmp_path):
    with open(run / "metrics.jsonl", "ab") as metrics:
        metrics.write(b'{"job_id": "\xff"}\n')
    result = export(squeeze, run, tmp_path / "export", expect=2)
    assert f"metrics.jsonl:{NUM_IMAGES + 1}: not a JSON line" in one_error_line(result.err)


def test_one_export_into_a_folder_at_a_time(squeeze, made_run, tmp_path):
    import filelock

    folder = tmp_path / "export"
    folder.mkdir()
    with filelock.FileLock(folder / ".squeeze-export.lock"):
        result = export(squeeze, made_run, folder, expect=2)
    assert "another squeeze export is writing it" in one_error_line(result.err)
    export(squeeze, made_run, folder)  # the lock file left behind is no obstacle


def test_a_link_as_the_export_folder_exports_into_the_folder_it_names(squeeze, made_run, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    result = export(squeeze, made_run, tmp_path / "link")
    assert f"to {real} ({NUM_IMAGES} in all" in result.out
    assert "exported 0 new images" in export(squeeze, made_run, real).out  # the same export, by either name
    assert "exported 0 new images" in export(squeeze, made_run, tmp_path / "link").out
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    result = export(squeeze, made_run, tmp_path / "broken", expect=2)
    assert "a broken symbolic link" in one_error_line(result.err)
    assert not (tmp_path / "nowhere").exists()
    # The run named through a link: a folder inside the real run folder is still inside it.
    (tmp_path / "run-link").symlink_to(made_run)
    result = export(squeeze, tmp_path / "run-link", made_run / "x", expect=2)
    assert "inside the run folder" in one_error_line(result.err)
    assert not (made_run / "x").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: "[" * 100_000,  # nested too deep for the parser
        lambda state: "[]",
        lambda state: json.dumps(state)[:-20],
        lambda state: json.dumps(state | {"parts": 5}),
        lambda state: json.dumps(state | {"job_ids": None}),
        lambda state: json.dumps(state | {"next_part": "1"}),
        lambda state: json.dumps(state | {"rows": {"train": None}}),
        lambda state: json.dumps(state | {"subject_splits": {"dog": "../../outside"}}),
    ],
    ids=["deep", "list", "truncated", "parts", "job-ids", "next-part", "rows", "split-path"],
)
def test_a_damaged_state_is_one_line_and_changes_nothing(squeeze, run, tmp_path, made_run, damage):
    folder = tmp_path / "export"
    export(squeeze, run, folder, "--subjects", "dog")
    state_path = folder / ".squeeze-export.json"
    state_path.write_text(damage(json.loads(state_path.read_text())))
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    result = export(squeeze, run, folder, "--subjects", "dog", expect=2)
    assert f"{state_path}: damaged (hint: export into a new folder" in one_error_line(result.err)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    "place, kind",
    [
        (lambda path: os.mkfifo(path), "a FIFO (named pipe)"),
        (lambda path: path.symlink_to("/dev/zero"), "a symbolic link"),
        (lambda path: path.mkdir(), "a folder"),
    ],
    ids=["fifo", "link", "folder"],
)
def test_a_special_file_at_the_state_says_what_it_is(squeeze, made_run, tmp_path, place, kind):
    folder = tmp_path / "export"
    folder.mkdir()
    place(folder / ".squeeze-export.json")
    with deadline(20):
        result = export(squeeze, made_run, folder, expect=2)
    assert f".squeeze-export.json: is {kind}, not a regular file" in one_error_line(result.err)
    assert sorted(path.name for path in folder.iterdir()) == [".squeeze-export.json"]


def _bomb_png(side: int = 30_000) -> bytes:
    """A small PNG whose header declares a huge grayscale image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def test_damaged_images_are_left_out_and_named(squeeze, run, tmp_path):
    (run / "dog" / "000-s0.png").unlink()
    os.mkfifo(run / "dog" / "000-s0.png")
    (run / "dog" / "000-s1.png").write_bytes(b"\x89PNG truncated")
    (run / "dog" / "001-s0.json").write_text("{not json")
    bomb = _bomb_png()  # with its sidecar edited to match: size and hash agree, it still must not decode
    (run / "dog" / "001-s1.png").write_bytes(bomb)
    sidecar = json.loads((run / "dog" / "001-s1.json").read_text())
    sidecar["png"] = {"size": len(bomb), "sha256": hashlib.sha256(bomb).hexdigest()}
    (run / "dog" / "001-s1.json").write_text(json.dumps(sidecar))
    folder = tmp_path / "export"
    with deadline(20):
        result = export(squeeze, run, folder)
    missing = [line for line in result.out.splitlines() if line.startswith("missing: ")]
    assert [line.split(":")[1].strip() for line in missing] == [
        "dog/000-s0.png",
        "dog/000-s1.png",
        "dog/001-s0.json",
        "dog/001-s1.png",
    ]
    assert "a FIFO (named pipe)" in missing[0] and "bytes, the sidecar records" in missing[1]
    assert "the sidecar is damaged" in missing[2] and "cannot be read" in missing[3]
    assert f"({NUM_IMAGES - 4} in all: train {NUM_IMAGES - 4}); 4 damaged images left out" in result.out
    assert len(json.loads((folder / ".squeeze-export.json").read_text())["job_ids"]) == NUM_IMAGES - 4
