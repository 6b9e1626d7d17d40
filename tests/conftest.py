"""Fixtures shared by the test modules: images and YAML files in a temporary folder, a project folder with
the example photos, planning a manifest, and the ``squeeze`` command run in this process."""

from __future__ import annotations

import io
import os
import shutil
import sys
import textwrap
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from support import unstamped

# Before any test module imports huggingface_hub (it reads the variable once, at import): no test may
# reach a hub, even when pytest is started without HF_HUB_OFFLINE=1.
os.environ["HF_HUB_OFFLINE"] = "1"
# Before torch is imported: the in-process `gen` runs use one thread whatever the load, so the pixels of
# two runs in one session never differ by their thread count (`processes.choose_threads` reads the load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = REPO_ROOT / "examples" / "images"


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image("refs/a.png", size=(32, 32), color=(255, 0, 0))`` writes an image under tmp_path."""

    def make(
        relative: str, size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40)
    ) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path)
        return path

    return make


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[..., Path]:
    """``write_file(text, name="manifest.yaml")`` writes dedented text under tmp_path."""

    def write(text: str, name: str = "manifest.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Path]:
    """``make_project(m=TEXT, other=TEXT)``: tmp_path with the example photos in ``images/`` and each
    manifest written as ``<name>.yaml``; returns tmp_path."""

    def make(**manifests: str) -> Path:
        if not (tmp_path / "images").exists():
            shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
        for name, text in manifests.items():
            (tmp_path / f"{name}.yaml").write_text(text)
        return tmp_path

    return make


@pytest.fixture(scope="session")
def plan_of() -> Callable[..., list]:
    """``plan_of(path, *set_overrides)``: the jobs `squeeze gen` would plan for a manifest."""
    from squeeze_cli.manifest import load_manifest
    from squeeze_cli.plan import plan_jobs

    def plan(path: str | Path, *overrides: str) -> list:
        loaded = load_manifest(str(path), overrides)
        return plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)

    return plan


@dataclass(frozen=True)
class CliRun:
    """One run of the console entry point: its exit status (None already mapped to 0) and what it printed."""

    code: int
    out: str
    err: str


@pytest.fixture(scope="session")
def squeeze() -> Callable[..., CliRun]:
    """``squeeze("validate", path)`` runs the console entry point ``squeeze_cli.cli.main`` in this process.

    The run must end in SystemExit, as the installed ``squeeze`` command does. Its stdout and stderr are
    captured here, without the UTC time stamps that start log lines off a terminal (tests/test_logs.py checks
    those), rather than with ``capsys`` so that module-scoped fixtures can use it too; should the run
    raise anything else, what it printed is passed on to pytest's own capture for the failure report.
    """
    from squeeze_cli.cli import main

    def run(*argv: str) -> CliRun:
        out, err = io.StringIO(), io.StringIO()
        try:
            with pytest.raises(SystemExit) as info, redirect_stdout(out), redirect_stderr(err):
                main(list(argv))
        except BaseException:
            sys.stdout.write(out.getvalue())
            sys.stderr.write(err.getvalue())
            raise
        code = info.value.code
        return CliRun(0 if code is None else code, unstamped(out.getvalue()), unstamped(err.getvalue()))

    return run


@pytest.fixture(autouse=True, scope="session")
def _offline_and_private_cache(tmp_path_factory: pytest.TempPathFactory):
    """No test may reach a hub, and the tiny checkpoint is built once per session in a private cache."""
    import os

    saved = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "SQUEEZE_CACHE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["SQUEEZE_CACHE"] = str(tmp_path_factory.mktemp("squeeze-cache"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _no_loading_patch_left_behind():
    """A model load patches globals while it runs (`support._loading_patches`). One left in place builds
    every later test's models untied and uninitialised, a failure far from its cause: it fails the test
    that left it (and is put back)."""
    from support import _loading_patches

    before = _loading_patches() if "transformers" in sys.modules else []
    yield
    left = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, name, value in before
        if getattr(owner, name) is not value
    ]
    for owner, name, value in before:
        setattr(owner, name, value)
    assert not left, f"left patched by this test (two model loads at once?): {', '.join(left)}"
