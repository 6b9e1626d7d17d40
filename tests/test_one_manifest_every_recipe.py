"""One manifest, every recipe: keys meant for one pipeline sit in `for_pipeline` blocks, applied when the
recipe runs that pipeline and skipped otherwise; every block is still checked against its own pipeline's
keys. The shipped examples validate with every shipped recipe and run with every tiny one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from squeeze_cli.manifest import load_manifest
from squeeze_cli.manifest.recipes import list_recipes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(recipe.name for recipe in list_recipes())
TINY_RECIPES = [name for name in RECIPES if name.startswith("tiny")]
MANIFESTS = ["demo.yaml", "catalog/catalog.yaml"]  # the catalog reads catalog/products.csv beside it

SCOPED = """\
version: 1
recipe: {recipe}
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  for_pipeline:
{blocks}
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts: ["a {{class}} in the snow"]
"""


def scoped(project: Path, recipe: str, blocks: str) -> Path:
    (project / "m.yaml").write_text(SCOPED.format(recipe=recipe, blocks=blocks))
    return project / "m.yaml"


def test_a_block_applies_only_when_its_pipeline_runs(make_project) -> None:
    project = make_project()
    blocks = "    squeeze: {guidance_scale: 3.7}\n    kontext: {guidance_scale: 1.5}"
    squeeze_params = load_manifest(scoped(project, "tiny", blocks)).subjects[0].prompts[0].params
    kontext_params = load_manifest(scoped(project, "tiny-kontext", blocks)).subjects[0].prompts[0].params
    qwen = load_manifest(scoped(project, "tiny-qwen-image-edit", blocks))  # reads no guidance: valid
    assert (squeeze_params.guidance_scale, kontext_params.guidance_scale) == (3.7, 1.5)
    assert (
        qwen.subjects[0].prompts[0].params.guidance_scale
        == load_manifest(scoped(project, "tiny-qwen-image-edit", "    squeeze: {}"))
        .subjects[0]
        .prompts[0]
        .params.guidance_scale
    )


def test_a_block_wins_over_its_level_and_a_lower_level_wins_over_it(make_project) -> None:
    project = make_project()
    (project / "m.yaml").write_text(
        SCOPED.format(recipe="tiny", blocks="    squeeze: {num_inference_steps: 3}").replace(
            'prompts: ["a {class} in the snow"]',
            'prompts: ["a {class} in the snow", {text: "a {class} at sea", num_inference_steps: 5}]',
        )
    )
    prompts = load_manifest(project / "m.yaml").subjects[0].prompts
    assert [prompt.params.num_inference_steps for prompt in prompts] == [3, 5]


@pytest.mark.parametrize(
    ("blocks", "where", "message"),
    [
        (
            "    qwen-image-edit-plus: {guidance_scale: 2.0}",
            "defaults.for_pipeline.qwen-image-edit-plus.guidance_scale",
            "`guidance_scale` is not used by the qwen-image-edit-plus pipeline",
        ),
        ("    flux9: {guidance_scale: 2.0}", "defaults.for_pipeline.flux9", "no pipeline is called 'flux9'"),
        (
            "    squeeze: {seeds: [1, 2]}",
            "defaults.for_pipeline.squeeze.seeds",
            "`seeds` cannot be set for one pipeline",
        ),
    ],
)
def test_a_wrong_block_is_a_located_error_whatever_the_recipe(
    make_project, squeeze, blocks: str, where: str, message: str
) -> None:
    project = make_project()
    result = squeeze("validate", str(scoped(project, "tiny-kontext", blocks)), "--json")
    assert result.code == 2, result.out
    problems = json.loads(result.out)["problems"]
    assert [(p["field"], message in p["message"]) for p in problems] == [(where, True)], problems


def test_an_unscoped_key_names_the_block_in_its_hint(make_project, squeeze) -> None:
    project = make_project()
    (project / "m.yaml").write_text(
        SCOPED.format(recipe="tiny-qwen-image-edit", blocks="    squeeze: {}").replace(
            "  reference_size: 32\n", "  reference_size: 32\n  guidance_scale: 2.0\n"
        )
    )
    result = squeeze("validate", str(project / "m.yaml"))
    assert result.code == 2 and "move it under `for_pipeline: {PIPELINE: ...}`" in result.err, result.err


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_every_example_validates_with_every_recipe(squeeze, manifest: str, recipe: str) -> None:
    """Real recipes may lack their weights here (that is reported apart); no key may be refused."""
    result = squeeze("validate", str(EXAMPLES / manifest), "--recipe", recipe, "--json")
    problems = json.loads(result.out).get("problems", [])
    assert [p for p in problems if not p["field"].startswith("model.")] == [], problems
    assert result.code in (0, 2), result.err


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TINY_RECIPES)
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_every_example_runs_with_every_tiny_recipe(
    tmp_path: Path, squeeze, manifest: str, recipe: str
) -> None:
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    folder = Path(manifest).parent  # a manifest in a folder of its own comes with that folder (its feed)
    if folder != Path("."):
        shutil.copytree(EXAMPLES / folder, tmp_path / folder)
    else:
        shutil.copy(EXAMPLES / manifest, tmp_path / manifest)
    out = tmp_path / "out"
    result = squeeze(
        "gen",
        str(tmp_path / manifest),
        "--recipe",
        recipe,
        "--out",
        str(out),
        "--set",
        "output.grids=false",
        "--set",
        "output.contact_sheet=false",
    )
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["jobs"]["failed"] == 0 and summary["jobs"]["succeeded"] > 0
