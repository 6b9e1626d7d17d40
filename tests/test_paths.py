"""Where a path starts: on the command line (`--recipe`, `--out`, a `--set` value) from the current folder,
inside a file from that file's folder; `manifest.resolved.yaml` reproduces a run from any folder;
`validate` prints the plan even when it reports missing weights; a LoRA folder without weights fails
`validate`, and one with only pickle weights fails it and `gen` without `--allow-pickle`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import EMPTY_SAFETENSORS, one_error_line, write_checkpoint_layout

from squeeze_cli.manifest import load_manifest
from squeeze_cli.plan import plan_jobs

MANIFEST = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
subjects:
  - name: dog
    class: dog
    references: [../images/dog/00.jpg]
    prompts: ["a {class} in the snow"]
"""
RECIPE = """\
name: trained
description: a recipe file such as `squeeze train` writes
model: {builtin: tiny, family: internvl, dtype: float32}
"""


@pytest.fixture
def project(make_project, monkeypatch) -> Path:
    """The current folder: `manifests/m.yaml`, `images/`, `photos/dog.jpg`, a recipe file in `runs/tiny/`
    and a LoRA folder in `weights/lora/`, none of them beside the manifest."""
    root = make_project()
    (root / "manifests").mkdir()
    (root / "manifests" / "m.yaml").write_text(MANIFEST)
    (root / "photos").mkdir()
    shutil.copy(root / "images" / "dog" / "00.jpg", root / "photos" / "dog.jpg")
    (root / "runs" / "tiny").mkdir(parents=True)
    (root / "runs" / "tiny" / "recipe.yaml").write_text(RECIPE)
    (root / "weights" / "lora").mkdir(parents=True)
    (root / "weights" / "lora" / "pytorch_lora_weights.safetensors").write_bytes(EMPTY_SAFETENSORS)
    monkeypatch.chdir(root)
    return root


def job_ids(loaded) -> list[str]:
    return [job.job_id for job in plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=10)]


# Paths on the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags", [["--recipe", "runs/tiny/recipe.yaml"], ["--set", "recipe=runs/tiny/recipe.yaml"]]
)
def test_a_recipe_path_on_the_command_line_is_relative_to_the_current_folder(project: Path, squeeze, flags):
    result = squeeze("validate", "manifests/m.yaml", "--json", *flags)
    assert result.code == 0, result.err
    assert json.loads(result.out)["recipe"] == str(project / "runs" / "tiny" / "recipe.yaml")


def test_a_recipe_path_in_the_manifest_is_relative_to_the_manifest(project: Path, squeeze):
    (project / "manifests" / "m.yaml").write_text(
        MANIFEST.replace("recipe: tiny", "recipe: ../runs/tiny/recipe.yaml")
    )
    assert squeeze("validate", "manifests/m.yaml").code == 0
    missing = squeeze("validate", "manifests/m.yaml", "--recipe", "runs/none.yaml")
    assert missing.code == 2
    assert f"cannot read recipe file '{project / 'runs' / 'none.yaml'}'" in missing.err
    assert "(hint: a path on the command line is relative to the current folder" in missing.err


def test_set_paths_are_relative_to_the_current_folder(project: Path):
    overrides = [
        "output.dir=rel-out",
        "model.lora.path=weights/lora",
        "subjects.0.references=[photos/dog.jpg]",
    ]
    loaded = load_manifest("manifests/m.yaml", overrides)
    assert loaded.output_dir == project / "rel-out"
    assert loaded.model.lora.path == str(project / "weights" / "lora")
    assert loaded.subjects[0].references == (str(project / "photos" / "dog.jpg"),)
    # One reference of a list written in the file: that one from the current folder, the other not.
    two = MANIFEST.replace("[../images/dog/00.jpg]", "[../images/dog/00.jpg, ../images/dog/02.jpg]")
    (project / "manifests" / "two.yaml").write_text(two)
    mixed = load_manifest("manifests/two.yaml", ["subjects.0.references.1=photos/dog.jpg"])
    assert mixed.subjects[0].references == (
        str(project / "images/dog/00.jpg"),
        str(project / "photos/dog.jpg"),
    )
    write_checkpoint_layout(project / "pipe")
    assert load_manifest("manifests/m.yaml", ["model={pipeline: ./pipe}"]).model.pipeline == str(
        project / "pipe"
    )
    # A hub id stays a hub id; a deeper path that is not there is a missing folder, not a hub id.
    hub = load_manifest("manifests/m.yaml", ["model={pipeline: org/name}"], check_sources=False)
    assert hub.model.pipeline == "org/name"
    typo = load_manifest("manifests/m.yaml", ["model.lora.path=runs/tiny/stage9/lora"], check_sources=False)
    assert typo.model.lora.path == str(project / "runs" / "tiny" / "stage9" / "lora")


def test_a_set_beside_a_recipe_leaves_the_recipes_paths_where_they_were(project: Path, squeeze):
    """`--set model.lora.scale=0.5` made the preset's `./weights/...` paths start from the current folder
    (other weights, or other job ids) and put their errors at that flag."""
    recipe = ["recipe=paper-internvl3-flux"]
    plain = load_manifest("manifests/m.yaml", recipe, check_sources=False).model
    scaled = load_manifest("manifests/m.yaml", [*recipe, "model.lora.scale=0.5"], check_sources=False).model
    assert scaled.lora.path == plain.lora.path == str(project / "manifests" / "weights" / "lora")
    assert scaled.components["aggregator"].path == plain.components["aggregator"].path
    # A component of the recipe's beside one given by --set: each where it was given.
    dla = load_manifest(
        "manifests/m.yaml", [*recipe, "model.components.aggregator.path=weights/lora"], check_sources=False
    ).model
    assert dla.components["aggregator"].path == str(project / "weights" / "lora")
    assert dla.lora.path == plain.lora.path
    result = squeeze(
        "validate", "manifests/m.yaml", "--recipe", "paper-internvl3-flux", "--set", "model.lora.scale=0.5"
    )
    assert result.code == 2
    assert "error: --recipe paper-internvl3-flux: model.lora.path: no such folder" in result.err, result.err
    assert "error: --set" not in result.err


def test_a_missing_set_path_names_the_current_folder(project: Path, squeeze):
    result = squeeze("validate", "manifests/m.yaml", "--set", "subjects.0.references=[nowhere.jpg]")
    assert result.code == 2
    hint = f"(hint: a path on the command line is relative to the current folder {project})"
    assert f"no such file: 'nowhere.jpg' {hint}" in result.err


def test_out_is_relative_to_the_current_folder(project: Path, squeeze):
    result = squeeze("gen", "manifests/m.yaml", "--out", "rel-out", "--dry-run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out.splitlines()[-1])["out"] == str(project / "rel-out")


# manifest.resolved.yaml reproduces the run ---------------------------------------------------------------


def test_the_resolved_manifest_reproduces_a_run_from_any_folder(project: Path, squeeze, monkeypatch):
    run = squeeze(
        "gen", "manifests/m.yaml", "--out", "rel-out", "--set", "subjects.0.references=[photos/dog.jpg]", "-q"
    )
    assert run.code == 0, run.err
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dry = squeeze("gen", "../rel-out/manifest.resolved.yaml", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    plan = json.loads(dry.out.splitlines()[-1])
    assert (plan["out"], plan["jobs"], plan["done"], plan["pending"]) == (str(project / "rel-out"), 1, 1, 0)


def test_the_resolved_manifest_keeps_the_model_of_command_line_paths(project: Path, monkeypatch):
    loaded = load_manifest(
        "manifests/m.yaml", ["model.lora.path=weights/lora", "recipe=runs/tiny/recipe.yaml"]
    )
    resolved = project / "manifest.resolved.yaml"
    resolved.write_text(loaded.resolved_yaml())
    monkeypatch.chdir(project / "images")
    again = load_manifest(resolved)
    assert again.model.lora.path == str(project / "weights" / "lora")
    assert again.model_identity == loaded.model_identity
    assert job_ids(again) == job_ids(loaded)


# validate prints the plan --------------------------------------------------------------------------------


def test_validate_prints_the_plan_also_when_weights_are_missing(project: Path, squeeze):
    result = squeeze("validate", "manifests/m.yaml", "--recipe", "paper-internvl3-flux")
    assert result.code == 2
    assert "model.components.aggregator.path: no such folder" in result.err
    assert "jobs      1 (limit 100,000)" in result.out and "work      about" in result.out
    assert "\nok:" not in result.out
    assert result.out.endswith(
        "not ok: the plan is valid, but the model's weights are not ready (see the errors)\n"
    )
    document = json.loads(
        squeeze("validate", "manifests/m.yaml", "--recipe", "paper-internvl3-flux", "--json").out
    )
    assert document["ok"] is False and document["jobs"] == 1 and document["estimated_cost"] > 0
    assert any(p["field"] == "model.lora.path" for p in document["problems"])
    # Another problem stops the plan: there is none to print.
    broken = squeeze(
        "validate", "manifests/m.yaml", "--recipe", "paper-internvl3-flux", "--set", "defaults.height=30"
    )
    assert broken.code == 2 and broken.out == ""


# A LoRA folder must hold LoRA weights --------------------------------------------------------------------


def test_an_empty_lora_folder_fails_validate(project: Path, squeeze):
    (project / "empty").mkdir()
    result = squeeze("validate", "manifests/m.yaml", "--set", "model.lora.path=empty")
    assert result.code == 2
    assert f"model.lora.path: {project / 'empty'} holds no LoRA weights (no .safetensors file)" in result.err
    assert "pytorch_lora_weights.safetensors" in result.err and "stage2/lora" in result.err
    named = squeeze(
        "validate", "manifests/m.yaml", "--set", "model.lora={path: weights/lora, weight_name: w.safetensors}"
    )
    assert named.code == 2 and f"{project / 'weights' / 'lora'} has no w.safetensors" in named.err
    assert squeeze("validate", "manifests/m.yaml", "--set", "model.lora.path=weights/lora").code == 0
    as_file = project / "weights" / "lora" / "pytorch_lora_weights.safetensors"
    assert squeeze("validate", "manifests/m.yaml", "--set", f"model.lora.path={as_file}").code == 0


def test_a_pickle_only_lora_folder_needs_allow_pickle_in_validate_as_in_gen(project: Path, squeeze):
    (project / "pickled").mkdir()
    (project / "pickled" / "adapter.bin").write_bytes(b"")
    flags = ("manifests/m.yaml", "--set", "model.lora.path=pickled")
    for command in (("validate",), ("gen", "--dry-run")):
        refused = squeeze(*command, *flags)
        assert refused.code == 2, refused.err
        line = one_error_line(refused.err)
        assert f"model.lora.path: {project / 'pickled'} holds only pickle (.bin) LoRA weights" in line
        assert "(hint: squeeze loads safetensors only; pass --allow-pickle if you trust" in line
        accepted = squeeze(*command, *flags, "--allow-pickle")
        assert accepted.code == 0, accepted.err


def test_a_pickle_lora_file_named_outright_needs_allow_pickle_too(project: Path, squeeze):
    """diffusers loads a file named by the path or by `weight_name` whatever its format: a .bin one loaded
    without --allow-pickle."""
    (project / "lora").mkdir()
    (project / "lora" / "adapter.bin").write_bytes(b"")
    for flags in (
        ("--set", "model.lora.path=lora/adapter.bin"),
        ("--set", "model.lora.path=lora", "--set", "model.lora.weight_name=adapter.bin"),
    ):
        refused = squeeze("validate", "manifests/m.yaml", *flags)
        assert refused.code == 2, refused.err
        line = one_error_line(refused.err)
        assert f"model.lora.path: {project / 'lora' / 'adapter.bin'} is not a .safetensors file" in line, line
        assert "pass --allow-pickle if you trust" in line
        assert squeeze("validate", "manifests/m.yaml", *flags, "--allow-pickle").code == 0


def test_train_set_paths_are_relative_to_the_current_folder(project: Path):
    from squeeze_cli.train.config import load_config, presets

    preset = Path(str(presets()["tiny"]))
    shutil.copytree(preset.parent / "tiny-data", project / "data")
    (project / "configs").mkdir()
    text = preset.read_text().replace("tiny-data/", "../data/")
    (project / "configs" / "c.yaml").write_text(text)
    in_file = load_config("configs/c.yaml")
    assert in_file.output_dir == project / "configs" / "runs" / "tiny"  # the file's own paths: its folder
    assert in_file.data_path == str(project / "data" / "samples.jsonl")
    given = load_config("configs/c.yaml", ["output_dir=rel-run", "recipe=runs/tiny/recipe.yaml"])
    assert (given.output_dir, given.recipe_base) == (project / "rel-run", project)
    packaged = load_config("tiny", ["data.path=data/samples.jsonl"])
    assert packaged.data_path == str(project / "data" / "samples.jsonl")


def test_dreambench_prints_a_next_command_that_works_without_weights(project: Path, squeeze):
    dataset = project / "dataset"
    dataset.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "dreambench" / "prompts_and_classes.txt", dataset)
    shutil.copytree(project / "images" / "dog", dataset / "dog")
    result = squeeze("dreambench", "dataset", "-o", "db.yaml")
    assert result.code == 0, result.err
    next_line = next(line for line in result.out.splitlines() if line.startswith("next: "))
    command = next_line.removeprefix("next: ").split("#")[0].split()
    assert command[:2] == ["squeeze", "validate"] and "--recipe" in command
    validated = squeeze(*command[1:])
    assert validated.code == 0, validated.err
    assert "jobs      100 (limit 100,000)" in validated.out


def test_images_in_the_output_folder_never_become_references(
    tmp_path: Path, squeeze, make_image, monkeypatch
) -> None:
    """An output folder inside a reference glob: the run's images, grids and sidecars (in the subjects'
    folders of OUT) are not swept into the next run's references, so a rerun has nothing to generate (it
    used to change every job id, for ever); the same with `--out`. A glob that matches only outputs says
    so."""
    photo = make_image("images/photo.png")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\n"
        "recipe: tiny\n"
        "output: {dir: images, grids: true, contact_sheet: true}\n"
        "defaults: {height: 32, width: 32, num_inference_steps: 2, reference_size: 32}\n"
        'subjects: [{name: dog, class: dog, references: ["images/**/*.png"], prompts: ["a {class}"]}]\n'
    )

    def pending(*flags: str) -> int:
        result = squeeze("gen", str(manifest), "--dry-run", "--json", *flags)
        assert result.code == 0, result.err
        return json.loads(result.out.splitlines()[-1])["pending"]

    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert (tmp_path / "images" / "dog" / "000-s0.png").is_file()
    assert load_manifest(manifest).subjects[0].references == (str(photo),)
    assert pending() == 0
    # A link beside the photos to an output image is an output too, and so is a link to a subject folder.
    (tmp_path / "images" / "alias.png").symlink_to(tmp_path / "images" / "dog" / "000-s0.png")
    (tmp_path / "images" / "folder-alias").symlink_to(tmp_path / "images" / "dog", target_is_directory=True)
    assert load_manifest(manifest).subjects[0].references == (str(photo),)
    assert pending() == 0
    (tmp_path / "images" / "alias.png").unlink()
    (tmp_path / "images" / "folder-alias").unlink()
    # With --out the same: the folder given on the command line is the one kept out of the globs.
    monkeypatch.chdir(tmp_path)
    assert squeeze("gen", str(manifest), "--out", "images/run", "--quiet").code == 0
    assert pending("--out", "images/run") == 0
    # A glob that matches nothing but outputs is refused, and says why.
    shutil.rmtree(tmp_path / "images" / "run")
    photo.unlink()
    refused = squeeze("validate", str(manifest))
    assert refused.code == 2 and "files squeeze writes in the output folder" in refused.err
    assert "keep the photos elsewhere" in refused.err


def test_the_run_files_of_an_output_folder_that_holds_the_photos_are_not_references(
    tmp_path: Path, squeeze, make_image
) -> None:
    """`--out photos` with `photos/*`: the second run found `run.json`, `index.jsonl` and
    `manifest.resolved.yaml` among the references ("not a readable image") and could never resume; and a
    recursive glob reached into the views folder's grids."""
    photo = make_image("photos/photo.png")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\n"
        "recipe: tiny\n"
        "output: {dir: photos, grids: true, views_dir: _views}\n"
        "defaults: {height: 32, width: 32, num_inference_steps: 2, reference_size: 32}\n"
        "subjects: [{name: dog, class: dog, prompts: ['a {class}'],"
        ' references: ["photos/*", "photos/**/*.png"]}]\n'
    )
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert {"run.json", "index.jsonl", "manifest.resolved.yaml"} <= {p.name for p in photo.parent.iterdir()}
    assert any((tmp_path / "photos" / "_views").rglob("*.png"))  # grids a recursive glob reaches
    assert load_manifest(manifest).subjects[0].references == (str(photo),)
    again = squeeze("gen", str(manifest), "--dry-run", "--json")
    assert again.code == 0, again.err
    assert json.loads(again.out.splitlines()[-1])["pending"] == 0


def test_keeping_outputs_out_of_globs_is_one_check_per_file_whatever_the_subjects(
    tmp_path: Path, make_image, monkeypatch
) -> None:
    """10,000 subjects with a glob each (a catalog feed) made `load_manifest` compare every file with every
    subject's folder: 3·10⁸ path comparisons, minutes. Now one comparison per file."""
    from squeeze_cli.manifest import resolve

    subjects = 40
    for index in range(subjects):
        make_image(f"photos/s{index}/a.png")
    lines = [
        f'  - {{name: s{index}, class: dog, references: ["photos/s{index}/*.png"], prompts: ["a {{class}}"]}}'
        for index in range(subjects)
    ]
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\nrecipe: tiny\noutput: {dir: out}\nsubjects:\n" + "\n".join(lines) + "\n")
    checks = []
    real = resolve._inside
    monkeypatch.setattr(resolve, "_inside", lambda path, folder: checks.append(path) or real(path, folder))
    loaded = load_manifest(manifest)
    assert len(loaded.subjects) == subjects and len(checks) == subjects
