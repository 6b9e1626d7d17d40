"""The catalog example (examples/catalog/: a 5-row CSV feed in shared scenes) runs nightly as
docs/catalog.md says: it renders with `--recipe tiny`, renders a new SKU's images only the next night, and
`--prune` moves a removed SKU's images aside. (That it validates with every recipe and runs with every
tiny one: tests/test_one_manifest_every_recipe.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(squeeze, manifest: Path, out: Path, *flags: str) -> dict:
    result = squeeze("gen", str(manifest), "--recipe", "tiny", "--out", str(out), "--quiet", *flags)
    assert result.code == 0, result.err
    return json.loads((out / "run.json").read_text())["jobs"]


@pytest.mark.slow  # two runs of gen, 30 images
def test_the_catalog_example_runs_nightly(tmp_path: Path, squeeze) -> None:
    shutil.copytree(REPO / "examples" / "catalog", tmp_path / "catalog")
    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    manifest, out = tmp_path / "catalog" / "catalog.yaml", tmp_path / "out"
    assert _run(squeeze, manifest, out)["succeeded"] == 25
    assert len(list((out / "BAG-RED").glob("0*.png"))) == 5

    # The next night: a new SKU is rendered, nothing else; a removed one's images move aside with --prune.
    feed = tmp_path / "catalog" / "products.csv"
    rows = feed.read_text().splitlines()
    rows = [row for row in rows if not row.startswith("CAN-COLA,")] + [
        "BAG-BLUE,backpack,blue,day pack,../images/backpack/02.jpg"
    ]
    feed.write_text("\n".join(rows) + "\n")
    jobs = _run(squeeze, manifest, out, "--prune")
    assert (jobs["planned"], jobs["skipped"], jobs["succeeded"]) == (25, 20, 5)
    assert not list(out.glob("CAN-COLA/*.png"))
    assert len(list((out / ".stale").glob("*/CAN-COLA/0*.png"))) == 5
    assert not (out / "CAN-COLA").exists()  # no empty folders (variants/<channel>/) left to publish
    assert json.loads(squeeze("status", str(out), "--json").out)["complete"] is True
