"""Licences of the weights: `gen` and `validate` warn once about a recipe whose licence does not allow
commercial use (unless the manifest acknowledges it), and every sidecar and `run.json` record it."""

from __future__ import annotations

import json
from pathlib import Path

NON_COMMERCIAL_RECIPE = """\
name: nc-tiny
description: the tiny model, labelled as a non-commercial one
license: {name: Some Non-Commercial License, commercial_use: false}
model: {builtin: tiny, family: internvl, dtype: float32}
defaults: {num_inference_steps: 2, height: 32, width: 32, reference_size: 32}
"""
MANIFEST = """\
version: 1
recipe: nc-tiny.yaml
{acknowledge}output: {{dir: out, grids: false, contact_sheet: false}}
defaults: {{seeds: [0, 1]}}
subjects:
  - {{name: dog, references: [images/dog/*.jpg], prompts: [a dog]}}
"""
WARNING = (
    "warning: {path}:2:9: recipe: 'nc-tiny' runs weights under the Some Non-Commercial License, which does "
    "not allow commercial use (hint: read the licence before using these images in a business; "
    "`acknowledge_license: non-commercial` in the manifest silences this warning)"
)


def project(make_project, acknowledge: str = "") -> Path:
    folder = make_project(m=MANIFEST.format(acknowledge=acknowledge))
    (folder / "nc-tiny.yaml").write_text(NON_COMMERCIAL_RECIPE)
    return folder / "m.yaml"


def test_gen_warns_once_and_records_the_license(make_project, squeeze) -> None:
    manifest = project(make_project)
    result = squeeze("gen", str(manifest))
    assert result.code == 0, result.err[-3000:]
    assert [line for line in result.err.splitlines() if line.startswith("warning:")] == [
        WARNING.format(path=manifest)
    ]
    license = {"name": "Some Non-Commercial License", "commercial_use": False, "url": None}
    out = manifest.parent / "out"
    for seed in (0, 1):
        assert json.loads((out / f"dog/000-s{seed}.json").read_text())["license"] == license
    assert json.loads((out / "run.json").read_text())["license"] == license


def test_validate_warns_and_an_acknowledgement_silences_it(make_project, squeeze) -> None:
    manifest = project(make_project)
    assert WARNING.format(path=manifest) in squeeze("validate", str(manifest)).err
    manifest = project(make_project, acknowledge="acknowledge_license: non-commercial\n")
    result = squeeze("validate", str(manifest))
    assert result.code == 0 and "warning" not in result.err


def test_acknowledge_license_takes_only_non_commercial(make_project, squeeze) -> None:
    manifest = project(make_project, acknowledge="acknowledge_license: yes please\n")
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and "m.yaml:3:" in result.err and "'non-commercial'" in result.err


def test_a_commercial_recipe_gives_no_warning(make_project, squeeze) -> None:
    manifest = make_project(m=MANIFEST.format(acknowledge="").replace("nc-tiny.yaml", "tiny"))
    result = squeeze("validate", str(manifest / "m.yaml"))
    assert result.code == 0 and "warning" not in result.err


def test_recipes_lists_each_license(squeeze) -> None:
    lines = squeeze("recipes").out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("kontext-dev ")))
    assert lines[at + 1].split() == "licence: FLUX.1 [dev] Non-Commercial License; commercial use: no".split()
    at = lines.index(next(line for line in lines if line.startswith("qwen-image-edit-plus ")))
    assert lines[at + 1].split() == "licence: Apache-2.0; commercial use: yes".split()
