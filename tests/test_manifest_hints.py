"""Help with manifest mistakes: names from other tools mapped to squeeze's keys, a hint to quote a prompt
with `{class}` in a flow list, and one that YAML reads in part (a leading `{class}` or quote, a `: ` in
it), one to list a prompt given as a plain string, the relative-path hint only for relative paths, `x-`
keys that hold YAML anchors (and the documented DreamBench example that uses them), and a negative prompt
without true CFG reported as ignored and left out of the PNG's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import ONE_IMAGE


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=ONE_IMAGE)


def test_names_from_other_tools_get_the_right_key(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        ONE_IMAGE.replace("  num_inference_steps: 2\n", "  steps: 2\n  cfg_scale: 3\n  seed: 4\n")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    assert "defaults.steps: unknown key `steps` (hint: squeeze calls it `num_inference_steps`)" in result.err
    assert (
        "defaults.cfg_scale: unknown key `cfg_scale` (hint: FLUX's distilled guidance is `guidance_scale`"
        in result.err
    )
    assert "defaults.seed: unknown key `seed` (hint: squeeze takes a list: `seeds: [42]`" in result.err


def test_an_unquoted_placeholder_in_a_flow_list_gets_a_hint_to_quote(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        ONE_IMAGE.replace('prompts: ["a {class} in the snow"]', "prompts: [a {class} in the snow]")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and "(hint: inside [...] a `{` starts a mapping: quote each prompt" in result.err


def test_a_prompt_written_where_a_list_belongs_gets_a_hint_to_make_it_an_item(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        ONE_IMAGE.replace('prompts: ["a {class} in the snow"]', "prompts: a {class} on a table")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    assert (
        "subjects[0].prompts: expected a list, got 'a {class} on a table' "
        "(hint: write one `- a {class} on a table` per line)"
    ) in result.err


@pytest.mark.parametrize(
    ("prompts", "hint"),
    [
        # A leading `{class}` opens a YAML mapping; the indentation hint sent people the wrong way.
        ("prompts:\n      - {class} in the snow", 'must be quoted whole: "{class} in the snow")'),
        ("prompts:\n      - text: {class} in the snow", 'must be quoted whole: "{class} in the snow")'),
        ("prompts:\n      - 'a {class}' in the snow", "must be quoted whole: \"'a {class}' in the snow\")"),
        # `: ` in a prompt: YAML cannot read it after a key, and reads it as a key and value in a list item.
        ("prompts:\n      - text: a {class}: at night", 'must be quoted: "a {class}: at night")'),
        ("prompts:\n      - a {class}: at night", 'quote the whole text, e.g. "a {class}: at night")'),
    ],
)
def test_a_prompt_yaml_reads_in_part_gets_a_hint_to_quote_it(
    project: Path, squeeze, prompts: str, hint: str
) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(ONE_IMAGE.replace('prompts: ["a {class} in the snow"]', prompts))
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and hint in result.err, result.err
    assert "indentation" not in result.err


def test_a_key_indented_too_deep_gets_the_indentation_hint(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(ONE_IMAGE.replace("    class: dog", "     class: dog"))
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    assert (
        "m.yaml:10:11: mapping values are not allowed in this context (hint: check the indentation"
        in result.err
    )


def test_a_prompt_set_where_a_list_belongs_gets_the_command_lines_list(project: Path, squeeze) -> None:
    """`- ...` one per line is no fix on the command line."""
    result = squeeze("validate", str(project / "m.yaml"), "--set", "subjects.0.prompts=a {class} at night")
    assert result.code == 2
    assert """(hint: a list: `--set 'subjects.0.prompts=["a {class} at night"]'`)""" in result.err


def test_no_relative_path_hint_for_an_absolute_path(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(ONE_IMAGE.replace("images/dog/00.jpg", str(project / "missing.jpg")))
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and "no such file" in result.err and "relative to" not in result.err
    manifest.write_text(ONE_IMAGE.replace("images/dog/00.jpg", "missing.jpg"))
    assert "paths are relative to the manifest's folder" in squeeze("validate", str(manifest)).err


def test_no_relative_path_hint_for_an_absolute_recipe_path(project: Path, squeeze) -> None:
    absolute = squeeze("validate", str(project / "m.yaml"), "--recipe", str(project / "none.yaml")).err
    assert "cannot read recipe file" in absolute and "relative to" not in absolute
    relative = squeeze("validate", str(project / "m.yaml"), "--recipe", "presets/none.yaml").err
    assert "(hint: a path on the command line is relative to the current folder)" in relative


def test_x_keys_hold_anchors_for_reuse(make_project, squeeze) -> None:
    project = make_project(
        m="""\
version: 1
recipe: tiny
x-prompts: &prompts
  - a {class} in the snow
  - a {class} on the beach
subjects:
  - {name: dog, class: dog, references: [images/dog/00.jpg], prompts: *prompts}
  - {name: backpack, class: backpack, references: [images/backpack/00.jpg], prompts: *prompts}
"""
    )
    summary = json.loads(squeeze("validate", str(project / "m.yaml"), "--json").out)
    assert summary["ok"] is True and [s["prompts"] for s in summary["subjects"]] == [2, 2]


def test_the_documented_dreambench_anchors_example_is_valid(make_image, tmp_path: Path) -> None:
    from squeeze_cli.manifest import load_manifest

    text = (Path(__file__).resolve().parents[1] / "docs" / "manifest.md").read_text()
    example = next(block for block in text.split("```yaml\n")[1:] if "x-object-prompts" in block)
    for subject in ("backpack", "can", "dog"):
        make_image(f"dreambench/{subject}/00.jpg")
    path = tmp_path / "dreambench.yaml"
    path.write_text(example.split("```", 1)[0])
    loaded = load_manifest(path, check_sources=False)  # the paper's weights are not on this machine
    assert [len(subject.prompts) for subject in loaded.subjects] == [5, 5, 3]
    assert loaded.subjects[1].prompts[0].text == "a can in the jungle"
    assert "x-object-prompts" not in loaded.resolved_yaml()


def test_a_negative_prompt_without_true_cfg_is_a_warning_and_left_out_of_the_png(
    project: Path, squeeze
) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        ONE_IMAGE.replace("  reference_size: 32\n", "  reference_size: 32\n  negative_prompt: blurry\n")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 0
    assert result.err.startswith(f"warning: {manifest}:8:20: defaults.negative_prompt: is ignored")
    assert "(hint: set `true_cfg_scale: 4.0`" in result.err
    as_json = json.loads(squeeze("validate", str(manifest), "--json").out)
    assert as_json["warnings"][0]["field"] == "defaults.negative_prompt"

    assert squeeze("gen", str(manifest), "--out", str(project / "out")).code == 0
    from squeeze_cli.outputs.records import read_png_parameters

    (png,) = (project / "out").glob("dog/[0-9]*-s*.png")
    parameters = read_png_parameters(png)
    assert "Negative prompt" not in parameters
    assert "CFG scale: 1, Distilled CFG Scale: 2.5," in parameters
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["timings"]["batch_size"] == 1 and isinstance(sidecar["timings"]["batch_size"], int)


@pytest.mark.parametrize("command", ["gen", "validate"])
def test_a_run_folder_given_for_the_manifest_names_the_manifest_it_recorded(
    project: Path, squeeze, command: str
) -> None:
    """`squeeze gen examples/squeeze-out` said "give the path of the manifest's .yaml file", not which one:
    the run folder's `manifest.resolved.yaml` reproduces the run."""
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet").code == 0
    result = squeeze(command, str(project / "out"))
    assert result.code == 2
    assert result.err.strip() == (
        f"error: {project / 'out'}: cannot read the manifest: it is the folder of a squeeze run (hint: give "
        f"the manifest it recorded, {project / 'out' / 'manifest.resolved.yaml'}, which reproduces the run)"
    )
    assert squeeze(command, str(project / "out" / "manifest.resolved.yaml")).code == 0
