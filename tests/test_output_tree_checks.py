"""The output folder is checked before a run loads the model or writes a file: a symbolic link, a FIFO or a
file where squeeze would write, and an empty `--out`, are each refused in one line that names the path and
the fix, and nothing is created or written through."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import FOUR_SEEDS, deadline, files_under, one_error_line

from squeeze_cli.errors import EXIT_INVALID


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=FOUR_SEEDS)


@pytest.mark.parametrize("name", [".squeeze.lock", "run.json", "index.jsonl", "manifest.resolved.yaml"])
def test_a_run_file_that_is_a_symlink_is_refused_and_its_target_untouched(
    project: Path, squeeze, name
) -> None:
    out = project / "out"
    out.mkdir()
    victim = project / "victim.txt"
    victim.write_text("precious\n")
    (out / name).symlink_to(victim)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    line = one_error_line(result.err)
    assert result.code == EXIT_INVALID
    assert line.startswith(f"error: {out / name} is a symbolic link, not a regular file (hint: remove it")
    assert victim.read_text() == "precious\n"
    assert files_under(out) == [name]


def test_a_shard_folder_that_is_a_symlink_is_refused(project: Path, squeeze) -> None:
    out, elsewhere = project / "out", project / "elsewhere"
    elsewhere.mkdir()
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "0-of-2").symlink_to(elsewhere)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", "0/2", "--quiet")
    line = one_error_line(result.err)
    assert result.code == EXIT_INVALID
    assert line.startswith(
        f"error: {out / 'shards' / '0-of-2'} is a symbolic link (hint: replace it by a real"
    )
    assert list(elsewhere.iterdir()) == []
    assert files_under(out) == ["shards", "shards/0-of-2"]


def test_a_subject_folder_that_is_a_symlink_inside_out_is_refused(project: Path, squeeze) -> None:
    out = project / "out"
    (out / "cat").mkdir(parents=True)
    (out / "dog").symlink_to(out / "cat")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err).startswith(f"error: {out / 'dog'} is a symbolic link")
    assert list((out / "cat").iterdir()) == []


def test_a_fifo_at_a_sidecar_path_is_refused_before_anything_runs(project: Path, squeeze) -> None:
    out = project / "out"
    (out / "dog").mkdir(parents=True)
    os.mkfifo(out / "dog" / "000-s1.json")
    with deadline():
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err).startswith(
        f"error: {out / 'dog' / '000-s1.json'} is a FIFO (named pipe), not a regular file (hint: remove it"
    )


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_out_is_refused(project: Path, squeeze, monkeypatch, value) -> None:
    work = project / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = squeeze("gen", str(project / "m.yaml"), "--out", value, "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err) == (
        f"error: --out {value!r}: the output folder is empty (hint: give the output folder, e.g. --out out)"
    )
    assert list(work.iterdir()) == []


def test_a_file_where_a_subject_folder_goes_is_refused_before_loading(
    project: Path, squeeze, monkeypatch
) -> None:
    from squeeze_cli.gen import worker

    def must_not_load(self) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(worker.Worker, "load", must_not_load)
    out = project / "out"
    out.mkdir()
    (out / "dog").write_text("not a folder")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err) == (
        f"error: {out / 'dog'} is a regular file, not a folder (hint: move or remove it: the images of "
        f"subject 'dog' go in the folder {out / 'dog'})"
    )
    assert files_under(out) == ["dog"]


# `output.views_dir`: the grids and contact sheets go in OUT/.views/<subject>/, drawn after every image.
VIEWS = FOUR_SEEDS.replace("defaults:", "output:\n  views_dir: .views\ndefaults:")


def _must_not_load(monkeypatch) -> None:
    from squeeze_cli.gen import worker

    def must_not_load(self) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(worker.Worker, "load", must_not_load)


@pytest.mark.parametrize(
    ("in_the_way", "says"),
    [
        (".views", "is a regular file, not a folder (hint: move or remove it: the grids and contact sheets"),
        (".views/dog", "is a regular file, not a folder (hint: move or remove it: the views of subject"),
        (".views/dog/grid-000.png", "is a FIFO (named pipe), not a regular file (hint: remove it"),
        (".views/dog/contact-sheet.png", "is a folder, not a regular file (hint: remove it"),
    ],
)
def test_a_views_path_in_the_way_is_refused_before_loading(
    make_project, squeeze, monkeypatch, in_the_way, says
) -> None:
    project = make_project(m=VIEWS)
    _must_not_load(monkeypatch)
    out = project / "out"
    path = out / in_the_way
    path.parent.mkdir(parents=True)
    if path.name.startswith("grid"):
        os.mkfifo(path)
    elif path.name.startswith("contact"):
        path.mkdir()
    else:
        path.write_text("not a folder")
    before = files_under(out)
    with deadline():
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err).startswith(f"error: {path} {says}")
    assert files_under(out) == before


def test_a_views_folder_that_is_a_link_is_refused_before_loading(make_project, squeeze, monkeypatch) -> None:
    project = make_project(m=VIEWS)
    _must_not_load(monkeypatch)
    out, elsewhere = project / "out", project / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / ".views").symlink_to(elsewhere)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err).startswith(f"error: {out / '.views'} is a symbolic link (hint: replace")
    assert files_under(out) == [".views"] and list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("replacement", ["file", "link outside OUT"])
def test_a_views_folder_replaced_during_the_run_is_a_write_error(
    make_project, squeeze, monkeypatch, replacement
) -> None:
    from squeeze_cli.gen import worker

    project = make_project(m=VIEWS)
    out, elsewhere = project / "out", project / "elsewhere"
    elsewhere.mkdir()
    generate = worker.Worker.run

    def generate_then_replace_the_views(self, *args, **kwargs):
        generate(self, *args, **kwargs)
        if replacement == "file":
            (out / ".views").write_text("not a folder")
        else:
            (out / ".views").symlink_to(elsewhere)

    monkeypatch.setattr(worker.Worker, "run", generate_then_replace_the_views)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    # The images are made: exit 1 (a failed write), not 2 ("nothing was generated"), and run.json finished.
    assert result.code == 1
    assert str(out / ".views") in one_error_line(result.err)
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "failed" and str(out / ".views") in summary["error"]
    assert len(list((out / "dog").glob("*.png"))) == 4
    assert list(elsewhere.iterdir()) == []
