from __future__ import annotations

import re
from pathlib import Path

import pytest

from squeeze_cli.errors import ManifestError, RecipeError
from squeeze_cli.manifest.recipes import (
    list_recipes,
    load_recipe,
    merge_model,
    model_identity,
    recipe_text,
    resolve_model_paths,
)
from squeeze_cli.manifest.schema import ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_FILES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def test_packaged_presets_are_listed():
    assert [recipe.name for recipe in list_recipes()] == [
        "flux2-dev",
        "flux2-klein-4b",
        "flux2-klein-9b-kv",
        "kontext-dev",
        "paper-internvl3-flux",
        "qwen-image-edit-2511",
        "qwen-image-edit-plus",
        "qwen2.5vl-flux",
        "tiny",
        "tiny-flux2-dev",
        "tiny-flux2-klein",
        "tiny-flux2-klein-kv",
        "tiny-kontext",
        "tiny-qwen-image-edit",
        "tiny-qwen-image-edit-2511",
    ]
    assert {path.stem for path in PRESET_FILES} == {recipe.name for recipe in list_recipes()}


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.name)
def test_every_preset_file_validates_and_documents_itself(path):
    recipe = load_recipe(path.stem)
    assert recipe.name == path.stem and recipe.description
    text = path.read_text()
    assert text.startswith("# "), "a preset opens with a comment saying what it is for"
    header = text.split("\nname:")[0]
    assert "squeeze " in header, "the opening comment shows the command that runs it"
    assert recipe.text == text == recipe_text(path.stem)
    assert ModelSpec.model_validate(recipe.model.model_dump())  # a complete model section


def test_tiny_says_its_weights_are_random_and_runs_small():
    recipe = load_recipe("tiny")
    assert "RANDOM" in recipe.text.splitlines()[0]
    assert recipe.model.builtin == "tiny" and recipe.model.dtype == "float32"
    defaults = recipe.defaults.explicit()
    assert defaults["height"] * defaults["width"] <= 64 * 64 and defaults["num_inference_steps"] <= 4


def test_paper_preset_matches_the_paper():
    recipe = load_recipe("paper-internvl3-flux")
    model = recipe.model
    assert model.components["mllm"].path == "OpenGVLab/InternVL3-8B-hf"
    assert model.components["transformer"].path == "black-forest-labs/FLUX.1-dev"
    assert model.lora is not None and model.dtype == "bfloat16"
    assert recipe.defaults.explicit() == {
        "num_inference_steps": 28,
        "guidance_scale": 2.5,
        "height": 512,
        "width": 512,
        "stage_thresholds": (0.95, 0.85),
        "reference_size": 512,
    }
    assert "50 GB" in recipe.text
    assert load_recipe("qwen2.5vl-flux").model.components["mllm"].path == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(RecipeError) as info:
        load_recipe("paper")
    assert info.value.message == "unknown recipe 'paper'"
    assert "kontext-dev, paper-internvl3-flux, qwen-image-edit-2511, qwen-image-edit-plus," in info.value.hint


def test_recipe_file_by_path(write_file, tmp_path):
    write_file(
        """
        # mine
        name: mine
        description: local
        model:
          components:
            mllm: {path: ./mllm}
            aggregator: {path: org/aggregator}
            transformer: {path: /abs/transformer}
            vae: {path: vae-folder, subfolder: vae}
            scheduler: {path: org/flux, subfolder: scheduler, revision: main}
        """,
        name="presets/mine.yaml",
    )
    (tmp_path / "presets/vae-folder").mkdir()
    recipe = load_recipe("presets/mine.yaml", relative_to=tmp_path)
    components = recipe.model.components
    assert recipe.source == str(tmp_path / "presets/mine.yaml")
    assert components["mllm"].path == str(tmp_path / "presets/mllm")
    assert components["aggregator"].path == "org/aggregator"  # a hub id stays a hub id
    assert components["transformer"].path == "/abs/transformer"
    assert components["vae"].path == str(tmp_path / "presets/vae-folder")  # exists, so local
    assert components["scheduler"].revision == "main"


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="cannot read recipe file"):
        load_recipe("nowhere/recipe.yaml")


def test_broken_recipe_file_reports_located_problems(write_file, tmp_path):
    path = write_file(
        """
        name: broken
        description: x
        model:
          components: {mllm: {path: a}, wrong: {path: b}}
          dtype: float8
        defaults: {height: 30}
        extra: 1
        """,
        name="broken.yaml",
    )
    with pytest.raises(ManifestError) as info:
        load_recipe(str(path))
    located = sorted((p.line, p.field) for p in info.value.problems)
    assert located == [
        (4, "model.components.wrong"),
        (5, "model.dtype"),
        (6, "defaults.height"),
        (7, "extra"),
    ]
    assert all(p.file == str(path) for p in info.value.problems)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"builtin": "tiny", "pipeline": "x"}, "set either `builtin` or `pipeline`, not both"),
        ({"builtin": "tiny", "components": {"vae": {"path": "v"}}}, "cannot be combined with `builtin`"),
        ({"components": {"mllm": {"path": "m"}}}, "lacks aggregator, transformer, vae, scheduler"),
        ({}, "no model source"),
        ({"builtin": "huge"}, "'tiny'"),
    ],
)
def test_model_section_rules(model, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelSpec.model_validate(model)


def test_merge_model():
    recipe = {
        "builtin": "tiny",
        "family": "internvl",
        "dtype": "float32",
        "lora": {"path": "a", "scale": 1.0},
    }
    assert merge_model(recipe, {"dtype": "float16", "lora": {"scale": 0.5}}) == {
        "builtin": "tiny",
        "family": "internvl",
        "dtype": "float16",
        "lora": {"path": "a", "scale": 0.5},
    }
    # Naming a source replaces the recipe's source rather than mixing the two.
    assert merge_model(recipe, {"pipeline": "org/pipe"})["pipeline"] == "org/pipe"
    assert "builtin" not in merge_model(recipe, {"pipeline": "org/pipe"})
    paper = {
        "components": {"mllm": {"path": "m"}, "vae": {"path": "v", "subfolder": "vae"}},
        "dtype": "bfloat16",
    }
    assert merge_model(paper, {"builtin": "tiny"}) == {"builtin": "tiny", "dtype": "bfloat16"}
    # Components are replaced one by one, each as a whole, so a single part can be swapped.
    assert merge_model(paper, {"components": {"vae": {"path": "w"}}})["components"] == {
        "mllm": {"path": "m"},
        "vae": {"path": "w"},
    }


def test_model_identity_is_stable_and_covers_what_changes_pixels():
    base = {"builtin": "tiny", "family": "internvl", "dtype": "float32"}
    identity = model_identity(base)
    assert len(identity) == 16
    assert identity == model_identity(ModelSpec.model_validate(base))
    assert identity == model_identity({**base, "trust_remote_code": True})
    assert identity == model_identity({**base, "components": {}})
    assert identity == model_identity(load_recipe("tiny").model)
    different = [
        {**base, "dtype": "bfloat16"},
        {**base, "family": "qwen2_5_vl"},
        {**base, "lora": {"path": "l"}},
        {**base, "lora": {"path": "l", "scale": 0.5}},
        {**base, "lora": {"path": "l", "weight_name": "w.safetensors"}},
        {"pipeline": "org/pipe", "dtype": "float32"},
        {"pipeline": "org/pipe", "dtype": "float32", "components": {"vae": {"path": "v", "revision": "r"}}},
    ]
    identities = {model_identity(model) for model in different}
    assert identity not in identities and len(identities) == len(different)


def test_resolve_model_paths_leaves_hub_ids(tmp_path):
    (tmp_path / "weights").mkdir()
    model = ModelSpec.model_validate(
        {"pipeline": "org/pipe", "lora": {"path": "weights"}, "components": {"vae": {"path": "~/vae"}}}
    )
    resolved = resolve_model_paths(model, tmp_path)
    assert resolved.pipeline == "org/pipe"
    assert resolved.lora.path == str(tmp_path / "weights")
    assert resolved.components["vae"].path == str(Path("~/vae").expanduser())


EXPECTED_LICENSES = {
    "kontext-dev": ("FLUX.1 [dev] Non-Commercial License", False),
    "paper-internvl3-flux": ("FLUX.1 [dev] Non-Commercial License", False),
    "qwen2.5vl-flux": ("FLUX.1 [dev] Non-Commercial License", False),
    "qwen-image-edit-plus": ("Apache-2.0", True),
    "tiny": ("none (random weights)", True),
    "tiny-kontext": ("none (random weights)", True),
    "tiny-qwen-image-edit": ("none (random weights)", True),
    "qwen-image-edit-2511": ("Apache-2.0", True),
    "tiny-qwen-image-edit-2511": ("none (random weights)", True),
    "flux2-klein-4b": ("Apache-2.0", True),
    "flux2-klein-9b-kv": ("FLUX.2 [klein] Non-Commercial License", False),
    "flux2-dev": ("FLUX.2 [dev] Non-Commercial License", False),
    "tiny-flux2-klein": ("none (random weights)", True),
    "tiny-flux2-klein-kv": ("none (random weights)", True),
    "tiny-flux2-dev": ("none (random weights)", True),
}


def test_every_packaged_recipe_states_its_weights_license():
    for recipe in list_recipes():
        assert "license" in recipe.text, f"{recipe.name} must state its licence"
        assert (recipe.license.name, recipe.license.commercial_use) == EXPECTED_LICENSES[recipe.name]


def test_a_recipe_file_without_a_license_has_an_unknown_one(write_file, tmp_path):
    write_file("name: mine\ndescription: local\nmodel: {builtin: tiny}\n", name="mine.yaml")
    recipe = load_recipe("mine.yaml", relative_to=tmp_path)
    assert (recipe.license.name, recipe.license.commercial_use) == ("unknown", None)


def test_a_license_must_say_whether_it_allows_commercial_use(write_file, tmp_path):
    write_file(
        "name: mine\ndescription: local\nlicense: {name: Mine}\nmodel: {builtin: tiny}\n", name="mine.yaml"
    )
    with pytest.raises(ManifestError) as info:
        load_recipe("mine.yaml", relative_to=tmp_path)
    assert "mine.yaml:3" in str(info.value) and "commercial_use" in str(info.value)
