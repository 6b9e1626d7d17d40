"""Small generic fixtures shared by the test modules: images and YAML files in a temporary folder."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


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
