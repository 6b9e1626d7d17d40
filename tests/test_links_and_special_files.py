"""Nothing is read or written through a symbolic link, and nothing blocks on a FIFO or a device or loops
on a directory link: atomic writes, locks, sidecars and the index; a manifest or recipe that is a device;
`**` globs over linked folders; a reference swapped for a FIFO while the model loads."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support import FOUR_SEEDS, deadline, env, finishes, one_error_line

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_INVALID
from squeeze_cli.images import check_image, load_rgb, upright_size
from squeeze_cli.reading import FileTooLargeError, NotARegularFileError, read_regular_file


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=FOUR_SEEDS)


# Writing and reading through links --------------------------------------------------------------------------


def test_an_atomic_write_never_goes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # A link at the file's own name is replaced by the new file, not written through.
    (out / "run.json").symlink_to(victim)
    outputs.atomic_write_text(out / "run.json", "new")
    assert not (out / "run.json").is_symlink() and (out / "run.json").read_text() == "new"
    assert victim.read_text() == "precious"
    # A link in place of the folder is refused.
    (out / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(outputs.UnsafeOutputPathError, match="it is a symbolic link"):
        outputs.atomic_write_bytes(out / "dog" / "000-s0.png", b"data")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_an_output_folder_that_is_a_link_is_written_in_the_folder_it_names(project: Path, squeeze) -> None:
    """OUT may be a link to a folder (docs/outputs.md): `gen` refused it after writing its locks there,
    and `eval` after scoring. Now each command works in the folder it names; a broken link is refused."""
    (project / "real").mkdir()
    (project / "link").symlink_to(project / "real", target_is_directory=True)
    made = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "link"), "--quiet")
    assert made.code == 0, made.err
    assert len(list((project / "real" / "dog").glob("00*-s*.png"))) == 4
    again = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "real"), "--dry-run", "--json")
    assert json.loads(again.out.splitlines()[-1])["pending"] == 0  # one run, whichever name is given
    for command in (
        ("status", str(project / "link"), "--merge"),
        ("eval", str(project / "link"), "--metrics", "tiny"),
        ("export", str(project / "link"), "-o", str(project / "dataset")),
    ):
        result = squeeze(*command)
        assert result.code == 0, (command, result.err)
    assert (project / "real" / "metrics.json").is_file() and (project / "link").is_symlink()
    # The run named by its real folder is the same run: the export goes on where it was.
    again = squeeze("export", str(project / "real"), "-o", str(project / "dataset"))
    assert again.code == 0, again.err
    (project / "broken").symlink_to(project / "nowhere", target_is_directory=True)
    for out in (project / "broken", project / "broken" / "sub"):  # the folder, or a folder on its way
        refused = squeeze("gen", str(project / "m.yaml"), "--out", str(out))
        assert refused.code == EXIT_INVALID
        assert "broken is a broken symbolic link" in one_error_line(refused.err)
        assert not (project / "nowhere").exists()


def test_the_lock_file_is_never_opened_through_a_link(tmp_path: Path) -> None:
    from squeeze_cli.gen.lock import DirectoryLock, LayoutLock

    victim = tmp_path / "victim"
    victim.write_text("precious")
    for lock, name in (
        (DirectoryLock(tmp_path), ".squeeze.lock"),
        (LayoutLock(tmp_path, None), ".squeeze-layout.lock"),
    ):
        (tmp_path / name).symlink_to(victim)
        with pytest.raises(outputs.OutputWriteError, match="symbolic links"):
            lock.acquire()
    assert victim.read_text() == "precious"


def test_a_sidecar_or_index_that_is_a_link_is_not_read_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"job_id": "a"}\n')
    (tmp_path / "000-s0.json").symlink_to(outside)
    assert outputs.read_sidecar(tmp_path / "000-s0.json") is None
    (tmp_path / "index.jsonl").symlink_to(outside)
    with pytest.raises(outputs.OutputWriteError, match="symbolic links"):
        outputs.read_index(tmp_path)


def test_a_path_that_leads_out_of_the_output_folder_is_refused_for_reads_too(tmp_path: Path) -> None:
    """`status` and `check` only read, yet said "refusing to write" of an index or a variant linked out."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.jsonl").symlink_to("/dev/zero")
    with pytest.raises(outputs.UnsafeOutputPathError) as refused:
        outputs.safe_join(tmp_path / "out", "index.jsonl")
    assert refused.value.one_line().startswith("refusing to use "), refused.value.one_line()
    assert "/dev/zero, outside the output directory" in refused.value.one_line()


# Devices, FIFOs and directory loops -------------------------------------------------------------------------


def squeeze_subprocess(*args: str, cwd: Path, cache: str | None = None) -> subprocess.CompletedProcess:
    """`squeeze ARGS` with 2 GB of address space at most: a read of /dev/zero fails fast, not the machine."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "squeeze_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_memory,
        env=env(cache or os.environ["SQUEEZE_CACHE"]),
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["validate", "/dev/zero"],
            "error: /dev/zero: cannot read the manifest: not a regular file (a character",
        ),
        (
            ["validate", "zero.yaml"],
            "error: zero.yaml:2:9: recipe: cannot read recipe file '/dev/zero': not a ",
        ),
        (
            ["validate", "m.yaml", "--recipe", "/dev/urandom"],
            "recipe file '/dev/urandom': not a regular file",
        ),
    ],
)
def test_a_device_as_manifest_or_recipe_is_refused_at_once(project: Path, args, expected) -> None:
    (project / "zero.yaml").write_text(FOUR_SEEDS.replace("recipe: tiny", "recipe: /dev/zero"))
    result = squeeze_subprocess(*args, cwd=project)
    assert result.returncode == EXIT_INVALID
    assert expected in one_error_line(result.stderr)


def test_a_folder_linked_to_itself_under_a_double_star_glob_counts_each_photo_once(
    project: Path, make_image
) -> None:
    from squeeze_cli.manifest import load_manifest

    make_image("photos/a.jpg")
    make_image("photos/sub/b.jpg")
    (project / "photos" / "loop").symlink_to(project / "photos")  # a link to itself
    (project / "photos" / "sub" / "up").symlink_to(project / "photos")  # a link to a parent
    (project / "photos" / "same.jpg").symlink_to(project / "photos" / "a.jpg")  # one file, two names
    (project / "g.yaml").write_text(
        FOUR_SEEDS.replace("[images/dog/00.jpg]", "[photos/**/*.jpg, photos/a.jpg, ./photos/sub/b.jpg]")
    )
    loaded = finishes(load_manifest, project / "g.yaml")
    assert loaded.subjects[0].references == (
        str(project / "photos" / "a.jpg"),
        str(project / "photos" / "sub" / "b.jpg"),
    )


def test_a_double_star_glob_still_finds_photos_behind_a_link_to_another_folder(
    project: Path, make_image
) -> None:
    from squeeze_cli.manifest.globs import glob_paths

    make_image("library/x.png")
    (project / "photos").mkdir()
    (project / "photos" / "library").symlink_to(project / "library")
    assert glob_paths(str(project / "photos" / "**" / "*.png")) == [str(project / "photos/library/x.png")]


def test_special_files_are_refused_without_blocking(tmp_path: Path, make_image) -> None:
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    assert finishes(check_image, str(fifo)) == "not a regular file (a FIFO (named pipe))"
    for reader in (upright_size, load_rgb):
        with pytest.raises(NotARegularFileError, match="FIFO"):
            finishes(reader, fifo)
    os.mkfifo(tmp_path / "000-s0.json")
    assert finishes(outputs.read_sidecar, tmp_path / "000-s0.json") is None
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(FileTooLargeError, match="limit"):
        read_regular_file(big, 1000)


def test_a_reference_swapped_for_a_fifo_after_validation_is_one_line(
    project: Path, monkeypatch, squeeze
) -> None:
    from squeeze_cli.gen import worker

    load = worker.Worker.load
    reference = project / "images" / "dog" / "00.jpg"

    def swap_during_load(self) -> None:  # what another program could do while the model loads
        load(self)
        reference.unlink()
        os.mkfifo(reference)

    monkeypatch.setattr(worker.Worker, "load", swap_during_load)
    with deadline():
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert result.code == EXIT_INVALID
    assert (
        "subjects[0].references: a reference cannot be read any more: NotARegularFileError"
        in one_error_line(result.err)
    )
    assert not (project / "out").exists()
