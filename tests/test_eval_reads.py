"""A cached `squeeze eval` reads no image: each PNG's stat is trusted as gen's resume trusts it (its
sha256 for the score cache comes from its sidecar), and each reference's sha256 from gen's
OUT/.squeeze-references.json. An image is read (checked before it is decoded) only when it is scored,
and `--verify` reads and checks every image, as before."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
from support import flip_byte_in_place, gen_example_run
from test_eval import MANIFEST, NUM_IMAGES, evaluate

from squeeze_cli import images, reading
from squeeze_cli.eval import scoring
from squeeze_cli.manifest import reference_facts
from squeeze_cli.outputs import resume

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, squeeze) -> Path:
    return gen_example_run(tmp_path_factory.mktemp("project"), squeeze, MANIFEST)


@pytest.fixture
def run(made_run: Path, tmp_path: Path) -> Path:
    """A copy of the run with its stat recorded again, as `gen` would after a copy (`record_stamps`)."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(made_run, copy)
    for sidecar in copy.glob("*/*.json"):
        record = json.loads(sidecar.read_text())
        info = os.stat(sidecar.with_suffix(".png"))
        record["png"].update(mtime_ns=info.st_mtime_ns, inode=info.st_ino)
        sidecar.write_text(json.dumps(record))
    # gen's OUT/.squeeze-references.json came along: the photos it names are the made run's, unmoved.
    assert (copy / reference_facts.REFERENCE_CACHE_NAME).is_file()
    return copy


@pytest.fixture
def image_reads(monkeypatch) -> list[str]:
    """Every image file opened, checked or hashed from now on."""
    seen: list[str] = []

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(path, *args, **kwargs):
            if str(path).lower().endswith(_IMAGE_SUFFIXES):
                seen.append(f"{name} {path}")
            return original(path, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(images, "check_image")
    counted(reference_facts, "check_image")
    counted(reference_facts, "file_digest")
    counted(scoring, "file_hash")
    counted(resume, "file_sha256")
    counted(reading, "open_regular_file")
    counted(os, "open")
    import builtins

    counted(builtins, "open")
    return seen


def flip_a_byte_in_place(png: Path) -> None:
    """Same size, same inode, the mtime put back: only reading the file tells (its IDAT's CRC fails)."""
    data = png.read_bytes()
    flip_byte_in_place(png, data.index(b"IDAT") + 8)
    assert zlib.crc32(png.read_bytes()) != zlib.crc32(data)


def test_a_cached_eval_reads_no_image(squeeze, run: Path, image_reads: list[str]):
    first = evaluate(squeeze, str(run), "--no-report")["runs"][0]
    assert first["cache"] == {"computed": 2 * NUM_IMAGES, "reused": 0}
    assert image_reads  # scoring decodes the images and references: the counting works
    image_reads.clear()
    again = evaluate(squeeze, str(run), "--no-report")["runs"][0]
    assert again["cache"] == {"computed": 0, "reused": 2 * NUM_IMAGES}
    assert again["overall"] == first["overall"] and again["missing"] == []
    assert image_reads == []


def test_verify_reads_every_image_and_scores_the_same(squeeze, run: Path, image_reads: list[str]):
    first = evaluate(squeeze, str(run), "--no-report")["runs"][0]
    image_reads.clear()
    verified = evaluate(squeeze, str(run), "--no-report", "--verify")["runs"][0]
    assert verified["cache"] == {"computed": 0, "reused": 2 * NUM_IMAGES}
    assert verified["overall"] == first["overall"]
    pngs = {str(sidecar.with_suffix(".png")) for sidecar in run.glob("*/*.json")}
    assert len(pngs) == NUM_IMAGES
    # and the reference photos too: `--verify` trusts no stat, not the run's reference cache either
    photos = {
        photo for sidecar in run.glob("*/*.json") for photo in json.loads(sidecar.read_text())["references"]
    }
    assert photos
    read = {
        kind: {r.split(" ", 1)[1] for r in image_reads if r.startswith(f"{kind} ")}
        for kind in ("file_sha256", "check_image")
    }
    assert read["file_sha256"] == pngs and read["check_image"] == pngs | photos


def test_an_image_changed_in_place_is_caught_by_verify(squeeze, run: Path):
    evaluate(squeeze, str(run), "--no-report")
    flip_a_byte_in_place(run / "dog" / "000-s0.png")
    # As gen's resume and status trust it, a cached eval does: scores from the cache, nothing read.
    assert evaluate(squeeze, str(run), "--no-report")["runs"][0]["images"] == NUM_IMAGES
    verified = evaluate(squeeze, str(run), "--no-report", "--verify")["runs"][0]
    assert verified["images"] == NUM_IMAGES - 1
    assert [line for line in verified["missing"] if line.startswith("dog/000-s0.png: ")] == [
        "dog/000-s0.png: does not match its sidecar: its sha256 differs (edited or replaced)"
    ]


def test_an_image_changed_in_place_is_never_decoded_when_it_is_scored(squeeze, run: Path):
    """Not cached: trusted by its stat, it is checked before it is decoded, and listed as before."""
    flip_a_byte_in_place(run / "dog" / "000-s0.png")
    summary = evaluate(squeeze, str(run), "--no-report")["runs"][0]
    assert summary["images"] == NUM_IMAGES - 1
    assert summary["cache"] == {"computed": 2 * (NUM_IMAGES - 1), "reused": 0}
    (line,) = [line for line in summary["missing"] if line.startswith("dog/000-s0.png: ")]
    assert line.startswith("dog/000-s0.png: cannot be read: the file is damaged"), line
