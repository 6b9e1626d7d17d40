"""`squeeze dreambench`: the full DreamBench manifest from the official layout, valid for `validate`."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from squeeze_cli.eval.dreambench import LIVE_CLASSES, parse_prompts_and_classes, write_dreambench_manifest

SHARED = Path("/work/shared/dreambench/dataset")
REPO = Path(__file__).resolve().parents[1]
PROMPTS_FILE = REPO / "tests" / "data" / "dreambench" / "prompts_and_classes.txt"  # the official file


@pytest.fixture
def full_dataset(tmp_path: Path) -> Path:
    """The official layout with all 30 subjects: the real prompts file, two small photos per subject."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    shutil.copy(PROMPTS_FILE, dataset)
    classes, _, _ = parse_prompts_and_classes(PROMPTS_FILE)
    photos = sorted((REPO / "examples" / "images" / "dog").glob("*.jpg"))
    for name in classes:
        (dataset / name).mkdir()
        for number, photo in enumerate(photos):
            shutil.copy(photo, dataset / name / f"{number:02d}.jpg")
    return dataset


def test_the_full_dreambench_manifest_is_valid(squeeze, full_dataset: Path, tmp_path: Path):
    manifest = tmp_path / "dreambench.yaml"
    result = squeeze("dreambench", str(full_dataset), "-o", str(manifest))
    assert result.code == 0, result.err
    assert "30 subjects (9 live), 750 prompts, 3000 images" in result.out
    document = yaml.safe_load(manifest.read_text())
    assert document["defaults"]["seeds"] == {"count": 4, "base": 0}
    subjects = {s["name"]: s for s in document["subjects"]}
    assert len(subjects) == 30
    assert subjects["bear_plushie"]["class"] == "stuffed animal"
    assert subjects["dog8"]["prompts"][10] == "a {class} wearing a red hat"  # live-subject list
    assert (
        subjects["teapot"]["prompts"][10] == "a {class} with a wheat field in the background"
    )  # object list
    assert all(len(s["prompts"]) == 25 and len(s["references"]) == 1 for s in subjects.values())
    assert sum(s["class"] in LIVE_CLASSES for s in subjects.values()) == 9
    assert subjects["can"]["references"] == ["dataset/can/00.jpg"]  # relative: the dataset is beside it

    validated = squeeze("validate", str(manifest), "--recipe", "tiny")
    assert validated.code == 0, validated.err
    assert "jobs      3,000" in validated.out


@pytest.mark.parametrize("choice, count", [("first", 1), ("2", 2), ("all", 2)])
def test_which_references_condition_generation(squeeze, full_dataset: Path, tmp_path: Path, choice, count):
    manifest = tmp_path / "m.yaml"
    assert squeeze("dreambench", str(full_dataset), "-o", str(manifest), "--references", choice).code == 0
    assert {len(s["references"]) for s in yaml.safe_load(manifest.read_text())["subjects"]} == {count}


def test_the_shared_partial_dataset(squeeze, tmp_path: Path):
    if not SHARED.is_dir():
        pytest.skip("needs the shared DreamBench copy")
    manifest = tmp_path / "m.yaml"
    result = squeeze("dreambench", str(SHARED), "-o", str(manifest), "--references", "all", "--seeds", "2")
    assert result.code == 0, result.err
    assert "24 subjects of prompts_and_classes.txt have no folder here" in result.out
    document = yaml.safe_load(manifest.read_text())
    assert [s["name"] for s in document["subjects"]] == ["backpack", "can", "cat", "dog", "dog8", "teapot"]
    assert document["subjects"][0]["references"][0] == str(SHARED.resolve() / "backpack" / "00.jpg")
    # The paper preset's trained weights are not here: validate says so (exit 2) and only that.
    validated = squeeze("validate", str(manifest))
    assert validated.code == 2 and "weights/aggregator" in validated.err and "references" not in validated.err
    assert squeeze("validate", str(manifest), "--recipe", "tiny").code == 0


def test_bad_inputs_are_one_line_errors(squeeze, full_dataset: Path, tmp_path: Path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("keep me")
    cases = [
        ((str(full_dataset), "-o", str(manifest)), "the file exists"),
        ((str(tmp_path / "nope"), "-o", str(tmp_path / "x.yaml")), "not a folder"),
        ((str(tmp_path), "-o", str(tmp_path / "x.yaml")), "cannot read"),
        ((str(full_dataset), "-o", str(tmp_path / "x.yaml"), "--references", "some"), "expected first"),
    ]
    for args, message in cases:
        result = squeeze("dreambench", *args)
        assert result.code == 2 and message in result.err and result.err.count("\n") == 1, (args, result.err)
    assert manifest.read_text() == "keep me" and not (tmp_path / "x.yaml").exists()
    (full_dataset / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog,dog\n")
    result = squeeze("dreambench", str(full_dataset), "-o", str(tmp_path / "x.yaml"))
    assert result.code == 2 and "found 0 object prompts, expected 25" in result.err


@pytest.mark.slow
def test_dreambench_gen_then_eval_reproduces_the_protocol(squeeze, full_dataset: Path, tmp_path: Path):
    for folder in full_dataset.iterdir():  # two subjects keep it quick: an object and a live one
        if folder.is_dir() and folder.name not in ("bear_plushie", "dog2"):
            shutil.rmtree(folder)
    manifest = tmp_path / "dreambench.yaml"
    assert (
        squeeze("dreambench", str(full_dataset), "-o", str(manifest), "--seeds", "1", "--recipe", "tiny").code
        == 0
    )
    out = tmp_path / "out"
    small = [
        f"--set=defaults.{key}"
        for key in ("height=32", "width=32", "num_inference_steps=1", "reference_size=32")
    ]
    result = squeeze("gen", str(manifest), "--out", str(out), "--quiet", "--batch-size", "25", *small)
    assert result.code == 0, result.err
    result = squeeze("eval", str(out), "--metrics", "tiny", "--references", str(full_dataset), "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)["runs"][0]
    assert summary["images"] == 50 and set(summary["subjects"]) == {"bear_plushie", "dog2"}
    assert summary["protocol"]["references"] == str(full_dataset.resolve())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(row["references"]) == 2 for row in rows)  # every photo of the subject, not only the first
    assert {row["clip_t_text"] for row in rows if row["subject"] == "bear_plushie"} >= {
        "a stuffed animal in the jungle",
        "a cube shaped stuffed animal",
    }


def test_force_replaces_only_a_regular_file(squeeze, full_dataset: Path, tmp_path: Path):
    """Renaming over a FIFO, a link or a device would replace it (as root, `-o /dev/null --force` replaced
    /dev/null): whatever is not a regular file is refused, --force or not, and left as it was."""
    kept = tmp_path / "kept.yaml"
    kept.write_text("keep me")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    link_to_file, link_to_fifo = tmp_path / "link.yaml", tmp_path / "stdout"  # as /dev/stdout is a link
    link_to_file.symlink_to(kept)
    link_to_fifo.symlink_to(fifo)
    broken = tmp_path / "broken.yaml"
    broken.symlink_to(tmp_path / "nowhere.yaml")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {fifo: "a FIFO", link_to_file: "a symbolic link", link_to_fifo: "a symbolic link"}
    cases |= {broken: "a symbolic link", folder: "a folder"}
    for path, kind in cases.items():
        for force in ([], ["--force"]):
            result = squeeze("dreambench", str(full_dataset), "-o", str(path), *force)
            assert result.code == 2 and result.err.count("\n") == 1, (path, result.err)
            assert f"-o {path}: is {kind}" in result.err and "regular file" in result.err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link_to_fifo) == str(fifo)
    assert os.readlink(link_to_file) == str(kept) and kept.read_text() == "keep me"
    assert not (tmp_path / "nowhere.yaml").exists() and list(folder.iterdir()) == []

    assert squeeze("dreambench", str(full_dataset), "-o", str(kept), "--force").code == 0
    assert yaml.safe_load(kept.read_text())["version"] == 1  # a regular file is replaced


@pytest.mark.parametrize("below", ["m.yaml/x.yaml", "m.yaml/sub/x.yaml"])
def test_a_file_in_place_of_the_manifests_folder_is_a_one_line_error(
    squeeze, full_dataset: Path, tmp_path: Path, below: str
):
    (tmp_path / "m.yaml").write_text("keep me")
    result = squeeze("dreambench", str(full_dataset), "-o", str(tmp_path / below))
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert f"{tmp_path / 'm.yaml'} is not a folder" in result.err and "finished images" not in result.err
    assert (tmp_path / "m.yaml").read_text() == "keep me"


def test_a_link_to_a_folder_is_written_in_that_folder(squeeze, full_dataset: Path, tmp_path: Path):
    (tmp_path / "real").mkdir()
    (tmp_path / "place").symlink_to(tmp_path / "real")
    assert squeeze("dreambench", str(full_dataset), "-o", str(tmp_path / "place" / "m.yaml")).code == 0
    assert (tmp_path / "real" / "m.yaml").is_file()


def test_only_regular_visible_image_files_are_references(squeeze, full_dataset: Path, tmp_path: Path):
    """macOS's `._00.jpg` sorts before `00.jpg`: with `--references first` it was the one chosen."""
    dog = full_dataset / "dog"
    (dog / "._00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (dog / "0.jpg").mkdir()
    os.mkfifo(dog / "000.jpg")
    (dog / "00-broken.jpg").symlink_to(dog / "gone.jpg")
    manifest = tmp_path / "m.yaml"
    assert squeeze("dreambench", str(full_dataset), "-o", str(manifest), "--references", "all").code == 0
    subjects = {s["name"]: s for s in yaml.safe_load(manifest.read_text())["subjects"]}
    assert subjects["dog"]["references"] == ["dataset/dog/00.jpg", "dataset/dog/01.jpg"]
    assert (
        squeeze("dreambench", str(full_dataset), "-o", str(manifest), "--references", "first", "--force").code
        == 0
    )
    assert {s["name"]: s for s in yaml.safe_load(manifest.read_text())["subjects"]}["dog"]["references"] == [
        "dataset/dog/00.jpg"
    ]


def test_a_photo_name_with_glob_characters_is_that_photo(full_dataset: Path, tmp_path: Path):
    """A manifest's references are globs: `*.jpg` written as it is would take every photo of the folder,
    `b[1].jpg` would match `b1.jpg` (or nothing)."""
    from squeeze_cli.manifest import load_manifest

    shutil.copy(full_dataset / "dog" / "01.jpg", full_dataset / "dog" / "*.jpg")  # sorts first
    for name in ("b[1].jpg", "b?.jpg"):
        shutil.copy(full_dataset / "cat" / "00.jpg", full_dataset / "cat" / name)
    manifest = tmp_path / "m.yaml"
    every_photo = tmp_path / "all.yaml"
    write_dreambench_manifest(full_dataset, manifest, references="first", recipe="tiny")
    write_dreambench_manifest(full_dataset, every_photo, references="all", recipe="tiny")
    first = {subject.name: subject.references for subject in load_manifest(str(manifest)).subjects}
    every = {subject.name: subject.references for subject in load_manifest(str(every_photo)).subjects}
    assert [Path(path).name for path in first["dog"]] == ["*.jpg"]
    assert sorted(Path(path).name for path in every["cat"]) == ["00.jpg", "01.jpg", "b?.jpg", "b[1].jpg"]


def test_a_newline_in_the_datasets_path_stays_in_the_header_comment(full_dataset: Path, tmp_path: Path):
    odd = tmp_path / "données\nrecipe: 'other'\\"
    full_dataset.rename(odd)
    manifest = tmp_path / "m.yaml"
    write_dreambench_manifest(odd, manifest, recipe="tiny")
    header = manifest.read_text().split("version: 1\n")[0]
    assert all(line.startswith("#") for line in header.splitlines()), header
    assert "squeeze eval squeeze-out/dreambench --references $'" in manifest.read_text()
    # The word is the path again in bash (`é` kept as UTF-8, not `\xe9`, which bash reads as one byte).
    word = re.search(r"--references (\$'.*') ", header).group(1)
    shown = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, check=True).stdout
    assert shown == os.fsencode(odd.resolve())
