"""Reference photos are read whole only when they are new or changed (`manifest/reference_facts.py`):
`gen` keeps each photo's check and sha256 in OUT/.squeeze-references.json with its stat, a rerun trusts
an unchanged stat, and anything that changes the stat (a rewrite in place with the mtime put back
included) reads the photo again."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from support import write_in_place

from squeeze_cli.errors import EXIT_INVALID, EXIT_JOBS_FAILED, EXIT_OK
from squeeze_cli.images import MAX_REFERENCE_PIXELS
from squeeze_cli.manifest import reference_facts
from squeeze_cli.manifest.reference_facts import REFERENCE_CACHE_NAME, ReferenceFacts, file_digest
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.plan import plan_jobs

MANIFEST = """\
version: 1
recipe: tiny
defaults: {height: 32, width: 32, num_inference_steps: 2, reference_size: 32, seeds: [0]}
subjects:
  - name: mug
    class: mug
    references: [refs/*.png]
    prompts: ["a {class} on a table"]
"""


def png_bytes(label: str) -> bytes:
    """A valid PNG whose bytes, but not length, depend on the one-character `label`."""
    info = PngInfo()
    info.add_text("label", label)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 90, 200)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_bytes(png_bytes("1"))
    (tmp_path / "refs" / "b.png").write_bytes(png_bytes("2"))
    (tmp_path / "m.yaml").write_text(MANIFEST)
    return tmp_path


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The photos read whole from now on (checked or hashed)."""
    seen: list[str] = []
    check, digest = reference_facts.check_image, reference_facts.file_digest
    monkeypatch.setattr(reference_facts, "check_image", lambda path: seen.append(path) or check(path))
    monkeypatch.setattr(reference_facts, "file_digest", lambda path: seen.append(path) or digest(path))
    return seen


def job_ids(project: Path) -> list[str]:
    manifest = load_manifest(project / "m.yaml", output_dir=project / "out")
    return [job.job_id for job in plan_jobs(manifest, model_identity="m", max_jobs=10)]


def test_a_rerun_reads_no_reference_photo(project, squeeze, reads):
    first = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert first.code == EXIT_OK, first.err
    photos = sorted(str(project / "refs" / name) for name in ("a.png", "b.png"))
    assert sorted(set(reads)) == photos  # the first run reads each photo: checked, then hashed
    cache = json.loads((project / "out" / REFERENCE_CACHE_NAME).read_text())
    assert sorted(cache["references"]) == photos
    reads.clear()
    again = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert again.code == EXIT_OK, again.err
    assert reads == []
    assert json.loads((project / "out" / "run.json").read_text())["jobs"]["skipped"] == 1


def test_a_photo_rewritten_in_place_with_its_mtime_put_back_is_read_again(project, reads):
    photo = project / "refs" / "a.png"
    facts = ReferenceFacts(project)
    assert facts.check(str(photo)) is None
    (project / REFERENCE_CACHE_NAME).write_text(facts.cache_json())
    write_in_place(photo, 0, png_bytes("9"))  # same inode, same size, other bytes, the mtime put back
    reads.clear()
    again = ReferenceFacts(project)
    assert again.check(str(photo)) is None
    assert str(photo) in reads  # the ctime moved: read again
    assert again.digest(str(photo)) == file_digest(str(photo)) != facts.digest(str(photo))


def test_an_unchanged_photo_is_trusted_and_the_cache_keeps_only_this_plans_photos(project, reads):
    a, b = str(project / "refs" / "a.png"), str(project / "refs" / "b.png")
    first = ReferenceFacts(project)
    assert first.check(a) is None and first.check(b) is None
    (project / REFERENCE_CACHE_NAME).write_text(first.cache_json())
    reads.clear()
    second = ReferenceFacts(project)
    assert second.check(a) is None and reads == []
    assert second.digest(a) == first.digest(a)
    assert second.changed  # b is no longer referenced: it leaves the cache
    assert list(json.loads(second.cache_json())["references"]) == [a]
    third = ReferenceFacts(project)
    third.check(a), third.check(b)
    assert not third.changed


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"format": 99, "references": {}}',
        b'{"format": 1, "references": {"PATH": [1, 2, 3, 4, 5, "not hex"]}}',
        b'{"format": 1, "references": {"PATH": [1, 2, 3, 4, 5, "00"]}}',
        b'{"format": 1, "references": {"PATH": ["1", 2, 3, 4, 5, "' + b"0" * 64 + b'"]}}',
        b'{"format": 1, "references": ["PATH"]}',
    ],
)
def test_a_damaged_or_foreign_cache_only_means_the_photos_are_read(project, reads, content):
    photo = str(project / "refs" / "a.png")
    (project / REFERENCE_CACHE_NAME).write_bytes(content.replace(b"PATH", photo.encode()))
    facts = ReferenceFacts(project)
    assert facts.check(photo) is None
    assert photo in reads and facts.digest(photo) == file_digest(photo)


def test_a_cache_that_lies_about_a_photo_with_another_stat_is_not_believed(project, reads):
    photo = str(project / "refs" / "a.png")
    facts = ReferenceFacts(project)
    facts.check(photo)
    entry = json.loads(facts.cache_json())
    entry["references"][photo][-1] = "0" * 64
    entry["references"][photo][0] += 1  # another size: not this file
    (project / REFERENCE_CACHE_NAME).write_text(json.dumps(entry))
    reads.clear()
    again = ReferenceFacts(project)
    assert again.check(photo) is None and photo in reads
    assert again.digest(photo) == file_digest(photo)


def large_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grayscale pixels, with a little (wrong) pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


@pytest.fixture
def no_large_decode(monkeypatch) -> None:
    """Decoding more pixels than the checks allow fails the test: it stands for the seconds and the GBs
    a decode of 67-179 Mpx takes."""
    from PIL import ImageFile

    load = ImageFile.ImageFile.load

    def bounded(self):
        if self.size[0] * self.size[1] > MAX_REFERENCE_PIXELS:
            raise AssertionError(f"decoded {self.size[0]}x{self.size[1]} pixels")
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", bounded)


# Above the checks' limit (67 Mpx), and PIL's warning (89 Mpx); below PIL's refusal (179 Mpx).
@pytest.mark.parametrize("size", [(8500, 8500), (9000, 10000), (12000, 12000)])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, above 89 Mpx
def test_a_forged_entry_does_not_let_a_photo_too_large_to_decode_through(
    project, squeeze, reads, no_large_decode, size
):
    """An entry whose stat matches, saying the photo passed its checks, is trusted without reading the
    photo; a photo of 67-179 Mpx, which the checks refuse (PIL only warns there, or says nothing), was
    decoded. The decode is bounded by the photo's own header: its jobs fail, naming it, decoding nothing."""
    photo = project / "refs" / "a.png"
    photo.write_bytes(large_png(*size))
    info = photo.stat()
    stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
    forged = {"format": 1, "references": {str(photo): [*stamp, "00" * 32]}}
    (project / "out").mkdir()
    (project / "out" / REFERENCE_CACHE_NAME).write_text(json.dumps(forged))
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert str(photo) not in reads  # trusted, as the cache is meant to be
    assert result.code == EXIT_JOBS_FAILED, result.err
    failed = [json.loads(line) for line in (project / "out" / "index.jsonl").read_text().splitlines()]
    assert [record["status"] for record in failed] == ["failed"]
    assert f"the image is too large: {size[0]}x{size[1]}, more than" in failed[0]["error"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, above 89 Mpx
def test_eval_stops_on_a_trusted_photo_too_large_to_decode_and_verify_leaves_it_out(
    project, squeeze, no_large_decode
):
    """A photo swapped for one of 90 Mpx with its entry forged to match (its hash kept, so the plan's job
    ids hold): eval's first scoring decoded it, now refused from its header, which was a traceback. It is
    one line pointing to --verify, which checks every photo again and leaves this one out."""
    out = project / "out"
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet").code == EXIT_OK
    photo = project / "refs" / "a.png"
    photo.write_bytes(large_png(9000, 10000))
    info = photo.stat()
    facts = json.loads((out / REFERENCE_CACHE_NAME).read_text())
    digest = facts["references"][str(photo)][-1]
    stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
    facts["references"][str(photo)] = [*stamp, digest]
    (out / REFERENCE_CACHE_NAME).write_text(json.dumps(facts))

    trusted = squeeze("eval", str(out), "--metrics", "tiny")
    assert trusted.code == EXIT_INVALID and "Traceback" not in trusted.err, trusted.err
    assert f"error: reference {photo} cannot be decoded (the image is too large: 9000x10000" in trusted.err
    assert "squeeze eval --verify" in trusted.err
    verified = squeeze("eval", str(out), "--metrics", "tiny", "--verify")
    assert verified.code == EXIT_OK, verified.err
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert any(note.startswith(f"reference {photo} cannot be read (the image is too large") for note in notes)


def test_a_changed_photo_gives_new_job_ids_on_the_next_run(project, squeeze):
    first = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert first.code == EXIT_OK, first.err
    before = job_ids(project)
    photo = project / "refs" / "a.png"
    write_in_place(photo, 0, png_bytes("7"))
    assert job_ids(project) != before
    again = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert again.code == EXIT_OK, again.err
    assert json.loads((project / "out" / "run.json").read_text())["jobs"]["succeeded"] == 1


def test_dry_runs_validate_and_shards_leave_the_cache_alone(project, squeeze):
    out = project / "out"
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--dry-run").code == EXIT_OK
    assert squeeze("validate", str(project / "m.yaml")).code == EXIT_OK
    assert not (out / REFERENCE_CACHE_NAME).exists()
    shard = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", "0/2", "--quiet")
    assert shard.code == EXIT_OK, shard.err
    assert not (out / REFERENCE_CACHE_NAME).exists()


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failed_run(project, squeeze):
    out = project / "out"
    (out / REFERENCE_CACHE_NAME).mkdir(parents=True)  # a folder where the file goes: the rename fails
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_OK, result.err
    assert "warning:" in result.err and "read again next run" in result.err


def test_verify_reads_every_photo_again_and_refreshes_the_cache(project, squeeze, reads):
    """`--verify` trusts no stat: not the images' (as before) and not the reference cache's either."""
    out = project / "out"
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet").code == EXIT_OK
    photos = sorted(str(project / "refs" / name) for name in ("a.png", "b.png"))
    reads.clear()
    assert squeeze("status", str(out)).code == EXIT_OK
    assert reads == []
    assert squeeze("status", str(out), "--verify").code == EXIT_OK
    assert sorted(set(reads)) == photos
    reads.clear()
    (out / REFERENCE_CACHE_NAME).write_text('{"format": 1, "references": {}}')  # as if photos were new
    verified = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet", "--verify")
    assert verified.code == EXIT_OK, verified.err
    assert sorted(set(reads)) == photos
    assert sorted(json.loads((out / REFERENCE_CACHE_NAME).read_text())["references"]) == photos
