"""Damaged and oversized files are called what they are: deeply nested JSON in a sidecar or an index line
is a damaged file (the image is made again, the index repaired), a file-size limit (`ulimit -f`) is
reported as that and not as a full disk, and the documented reference size limit is the one checked."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support import FOUR_SEEDS, env

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_JOBS_FAILED, EXIT_OK
from squeeze_cli.images import MAX_REFERENCE_PIXELS, check_image
from squeeze_cli.outputs import layout

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache() -> str:
    from squeeze_cli.loading import ensure_tiny_checkpoint

    ensure_tiny_checkpoint("internvl")
    return os.environ["SQUEEZE_CACHE"]


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=FOUR_SEEDS)


def test_deeply_nested_sidecars_and_index_lines_count_as_damaged(project: Path, squeeze, plan_of) -> None:
    out = project / "out"
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet").code == EXIT_OK
    jobs = plan_of(project / "m.yaml")
    layout.sidecar_path(out, jobs[0]).write_text("[" * 100000)
    with open(out / "index.jsonl", "a") as index:
        index.write("[" * 100000 + "\n")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_OK, result.err
    assert outputs.read_sidecar(layout.sidecar_path(out, jobs[0]))["job_id"] == jobs[0].job_id  # redone
    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]  # all parse
    assert sorted(line["job_id"] for line in lines) == sorted(job.job_id for job in jobs)


# A file-size limit ------------------------------------------------------------------------------------------


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # what a parent may hand down; squeeze must not die of it
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from squeeze_cli.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_file_size_limit_is_reported_as_such(project: Path, tiny_cache: str) -> None:
    out = project / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FILE_SIZE_LIMIT,
            "3000",
            "gen",
            str(project / "m.yaml"),
            "--out",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(tiny_cache),
    )
    assert result.returncode == EXIT_JOBS_FAILED, result.stderr  # not killed by SIGXFSZ
    line = result.stderr.strip().splitlines()[-1]
    assert "file too large (a file-size limit, ulimit -f, of 3000 bytes)" in line, result.stderr
    assert "No space left" not in result.stderr and "Traceback" not in result.stderr
    assert "(hint: raise the limit (ulimit -f unlimited)" in line


def test_writes_under_a_file_size_limit_say_so(tmp_path: Path) -> None:
    code = (
        "import resource, sys\n"
        "from squeeze_cli import outputs\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))\n"
        "for write in (\n"
        f"    lambda: outputs.append_index({str(tmp_path)!r}, {{'job_id': 'a', 'prompt': 'x' * 200}}),\n"
        f"    lambda: outputs.atomic_write_bytes({str(tmp_path / 'run.json')!r}, b'x' * 200),\n"
        "):\n"
        "    try:\n"
        "        write()\n"
        "    except outputs.OutputWriteError as error:\n"
        "        print(error.one_line(), error.errno)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stderr
    for line in lines:
        assert "file too large (a file-size limit, ulimit -f, of 100 bytes)" in line
        assert line.split()[-1] == str(errno.EFBIG)
    assert (tmp_path / "index.jsonl").read_bytes() == b""  # the cut-off line was removed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.jsonl"]  # no temporary file


# The reference size limit -----------------------------------------------------------------------------------


def test_the_documented_reference_limit_is_the_checked_one(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (9000, 16)).save(wide)  # wider than 8192, far fewer pixels than the limit
    assert check_image(str(wide)) is None
    docs = (REPO_ROOT / "docs" / "manifest.md").read_text()
    assert f"at most {MAX_REFERENCE_PIXELS:,} pixels in all" in docs
