"""Comparisons in one command: `--recipe A,B,C` runs one manifest through several recipes, each into its own
run folder under OUT; `status` and `eval` on OUT take each run in it."""

from __future__ import annotations

import json

import pytest
from support import ONE_IMAGE, files_under, one_error_line

from squeeze_cli.errors import EXIT_SIGINT, ModelLoadError

TWO_RECIPES = "tiny,tiny-kontext"


def test_validate_plans_each_recipe_into_its_own_folder(make_project, squeeze) -> None:
    project = make_project(m=ONE_IMAGE)
    result = squeeze("validate", str(project / "m.yaml"), "--recipe", TWO_RECIPES, "--json")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["ok"] is True
    assert [(run["recipe"], run["output_dir"]) for run in document["recipes"]] == [
        ("tiny", str(project / "squeeze-out" / "tiny")),
        ("tiny-kontext", str(project / "squeeze-out" / "tiny-kontext")),
    ]
    text = squeeze("validate", str(project / "m.yaml"), "--recipe", TWO_RECIPES)
    assert text.code == 0 and text.out.count("ok: the manifest is valid") == 2, text.out


@pytest.mark.parametrize(
    ("recipes", "message"),
    [
        ("tiny,,tiny-kontext", "error: --recipe tiny,,tiny-kontext: an empty recipe name"),
        ("tiny,TINY", "error: --recipe tiny,TINY: two recipes would share the folder OUT/tiny/"),
    ],
)
def test_a_wrong_recipe_list_is_a_usage_error(make_project, squeeze, recipes: str, message: str) -> None:
    project = make_project(m=ONE_IMAGE)
    for command in ("validate", "gen"):
        result = squeeze(command, str(project / "m.yaml"), "--recipe", recipes)
        assert result.code == 2 and one_error_line(result.err).startswith(message), result.err
    assert not (project / "squeeze-out").exists()


def test_every_recipe_is_checked_before_any_model_loads(make_project, squeeze) -> None:
    # `guidance_scale` is not read by the Qwen pipeline: the third recipe's plan is refused, so the first
    # two do not run either.
    project = make_project(m=ONE_IMAGE.replace("  height: 32\n", "  height: 32\n  guidance_scale: 2.0\n"))
    result = squeeze("gen", str(project / "m.yaml"), "--recipe", "tiny,tiny-kontext,tiny-qwen-image-edit")
    assert result.code == 2, result.err
    assert "`guidance_scale` is not used by the qwen-image-edit-plus pipeline" in result.err
    assert not (project / "squeeze-out").exists()


def test_several_recipes_are_not_written_into_a_run_folder(make_project, squeeze) -> None:
    project = make_project(m=ONE_IMAGE)
    (project / "squeeze-out").mkdir()
    (project / "squeeze-out" / "manifest.resolved.yaml").write_text("version: 1\n")
    result = squeeze("gen", str(project / "m.yaml"), "--recipe", TWO_RECIPES, "--dry-run")
    assert result.code == 2
    assert "is the run folder of one recipe" in one_error_line(result.err)


def test_a_recipe_folder_that_is_a_link_is_refused(make_project, squeeze) -> None:
    # OUT/tiny-kontext leading to OUT/tiny: the second recipe's images would replace the first's.
    project = make_project(m=ONE_IMAGE)
    out = project / "squeeze-out"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny-kontext").symlink_to("tiny")
    for dry_run in ((), ("--dry-run",)):
        result = squeeze("gen", str(project / "m.yaml"), "--recipe", TWO_RECIPES, *dry_run)
        assert result.code == 2, result.err
        assert f"{out / 'tiny-kontext'} is a symbolic link" in one_error_line(result.err)
        assert files_under(out) == ["tiny", "tiny-kontext"]


@pytest.mark.parametrize("inside", ["runs", "record"])
def test_one_recipe_is_not_written_into_the_folder_of_several(make_project, squeeze, inside: str) -> None:
    project = make_project(m=ONE_IMAGE)
    out = project / "squeeze-out"
    if inside == "runs":
        for recipe in ("tiny", "tiny-kontext"):
            (out / recipe).mkdir(parents=True)
            (out / recipe / "manifest.resolved.yaml").write_text("version: 1\n")
    else:  # `gen --recipe A,B` stopped before either run began
        out.mkdir()
        (out / ".squeeze-recipes.json").write_text('{"recipes": ["tiny", "tiny-kontext"]}\n')
    before = files_under(out)
    for flags in (("--recipe", "tiny"), ("--dry-run",)):
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), *flags)
        assert result.code == 2, result.err
        line = one_error_line(result.err)
        assert f"{out} holds the run folders of `gen --recipe A,B`" in line and "give one of them" in line
        assert files_under(out) == before


def test_status_names_a_recipe_that_did_not_run(make_project, squeeze, monkeypatch) -> None:
    from squeeze_cli.gen import runner

    real_run_gen = runner.run_gen

    def run_gen(manifest, options, **kwargs):
        if manifest.output_dir.name == "tiny-kontext":  # killed before its folder was made
            return EXIT_SIGINT
        return real_run_gen(manifest, options, **kwargs)

    monkeypatch.setattr(runner, "run_gen", run_gen)
    project = make_project(m=ONE_IMAGE)
    out = project / "squeeze-out"
    assert squeeze("gen", str(project / "m.yaml"), "--recipe", TWO_RECIPES).code == EXIT_SIGINT
    assert json.loads((out / ".squeeze-recipes.json").read_text()) == {"recipes": ["tiny", "tiny-kontext"]}
    for problem, make in [
        ("missing", lambda path: None),
        ("not a folder (a regular file)", lambda path: path.write_text("")),
        ("a broken symbolic link", lambda path: path.symlink_to("nowhere")),
    ]:
        make(out / "tiny-kontext")
        text = squeeze("status", str(out))
        assert text.code == 1, text.out
        assert f"recipe tiny-kontext: {out / 'tiny-kontext'} is {problem}" in text.out
        # One run inside: still the document of several, and `.runs[].complete` sees the missing one.
        document = squeeze("status", str(out), "--json")
        assert document.code == 1
        runs = json.loads(document.out)["runs"]
        assert [(run["out"], run["complete"]) for run in runs] == [
            (str(out / "tiny"), True),
            (str(out / "tiny-kontext"), False),
        ]
        (out / "tiny-kontext").unlink(missing_ok=True)
    # eval of the folder compares the runs there, and says which recipe it could not.
    evaluated = squeeze("eval", str(out), "--metrics", "tiny")
    assert evaluated.code == 0, evaluated.err
    assert f"warning: recipe tiny-kontext: {out / 'tiny-kontext'} is missing" in evaluated.err


@pytest.mark.slow
def test_two_recipes_render_status_and_compare(make_project, squeeze) -> None:
    project = make_project(m=ONE_IMAGE)
    out = project / "squeeze-out"
    result = squeeze("gen", str(project / "m.yaml"), "--recipe", TWO_RECIPES)
    assert result.code == 0, result.err
    for recipe in ("tiny", "tiny-kontext"):
        sidecar = json.loads((out / recipe / "dog" / "000-s0.json").read_text())
        assert sidecar["preset"] == recipe

    again = squeeze("gen", str(project / "m.yaml"), "--recipe", TWO_RECIPES, "--json")  # resumes each
    events = [json.loads(line) for line in again.out.splitlines()]
    assert again.code == 0 and [e["recipe"] for e in events if e["event"] == "recipe"] == [
        "tiny",
        "tiny-kontext",
    ]
    assert {"event": "recipes", "results": {"tiny": 0, "tiny-kontext": 0}} in events

    status = squeeze("status", str(out), "--json")
    assert status.code == 0, status.err
    runs = json.loads(status.out)["runs"]
    assert [(run["out"], run["complete"]) for run in runs] == [
        (str(out / "tiny"), True),
        (str(out / "tiny-kontext"), True),
    ]

    compared = squeeze("eval", str(out), "--metrics", "tiny", "--no-report")
    assert compared.code == 0, compared.err
    table = compared.out.split("\n\nscores:")[0].rsplit("\n\n", 1)[1]  # the side-by-side table
    assert "dog              tiny" in table and "dog      tiny-kontext" in table, compared.out


@pytest.mark.slow
def test_a_recipe_that_fails_keeps_the_others_images(make_project, squeeze, monkeypatch) -> None:
    from squeeze_cli.gen import runner

    real_run_gen = runner.run_gen

    def run_gen(manifest, options, **kwargs):
        if manifest.output_dir.name == "tiny-kontext":
            raise ModelLoadError("the transformer's weights are damaged")
        return real_run_gen(manifest, options, **kwargs)

    monkeypatch.setattr(runner, "run_gen", run_gen)
    project = make_project(m=ONE_IMAGE)
    result = squeeze("gen", str(project / "m.yaml"), "--recipe", "tiny-kontext,tiny")
    assert result.code == 1, result.err
    assert "error: recipe tiny-kontext: the transformer's weights are damaged" in result.err
    assert "recipes: 1 of 2 finished every job; not: tiny-kontext" in result.err
    assert (project / "squeeze-out" / "tiny" / "dog" / "000-s0.png").is_file()
