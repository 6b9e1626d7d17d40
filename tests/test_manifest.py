from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import yaml
from support import EMPTY_SAFETENSORS, write_checkpoint_layout

from squeeze_cli.errors import ManifestError, Problem
from squeeze_cli.manifest.located import format_field_path, parse_override
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.manifest.schema import DEFAULT_MAX_JOBS, MAX_SEED
from squeeze_cli.params import SamplingParams
from squeeze_cli.plan import plan_jobs

REPO_ROOT = Path(__file__).resolve().parent.parent

VALID = """
version: 1
recipe: tiny
defaults:
  height: 64
  width: 64
  seeds: [0, 1]
subjects:
  - name: dog
    class: dog
    references: [refs/dog/*.png]
    prompts:
      - a {class} in the snow
      - text: a {subject} {class} on the beach
        seeds: {count: 3, base: 10}
        guidance_scale: 4.0
"""


@pytest.fixture
def refs(make_image):
    make_image("refs/dog/b.png")
    make_image("refs/dog/a.png", color=(0, 0, 255))
    make_image("refs/cat/x.png")


def problems_of(path, *args, **kwargs) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, *args, **kwargs)
    return info.value.problems


def only_problem(path, *args, **kwargs) -> Problem:
    problems = problems_of(path, *args, **kwargs)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def manifest_with(
    write_file, subject_extra: str = "", top_extra: str = "", prompts: str = '["a {class}"]'
) -> Path:
    return write_file(
        f"""
version: 1
recipe: tiny
{top_extra}
subjects:
  - name: dog
    class: dog
    references: [refs/dog/a.png]
    prompts: {prompts}
{subject_extra}
"""
    )


# Valid manifests ------------------------------------------------------------------------------------


def test_valid_manifest_resolves_references_prompts_seeds_and_params(refs, write_file, tmp_path):
    manifest = load_manifest(write_file(VALID))
    (subject,) = manifest.subjects
    assert subject.name == "dog" and subject.class_noun == "dog"
    assert subject.references == (str(tmp_path / "refs/dog/a.png"), str(tmp_path / "refs/dog/b.png"))
    first, second = subject.prompts
    assert first.text == "a dog in the snow" and first.template == "a {class} in the snow"
    assert tuple(first.seeds) == (0, 1)
    assert second.text == "a dog dog on the beach"
    assert list(second.seeds) == [10, 11, 12]
    # recipe tiny sets 4 steps and reference_size 64; the manifest sets size; the prompt sets guidance
    assert first.params == SamplingParams(num_inference_steps=4, height=64, width=64, reference_size=64)
    assert second.params.guidance_scale == 4.0 and first.params.guidance_scale == 2.5
    assert manifest.output_dir == tmp_path / "squeeze-out"
    assert manifest.max_jobs == DEFAULT_MAX_JOBS
    assert manifest.num_jobs == 5
    assert manifest.model.builtin == "tiny"


def test_merge_order_recipe_defaults_subject_prompt(refs, write_file):
    path = write_file(
        """
        version: 1
        recipe: tiny
        defaults: {num_inference_steps: 6, guidance_scale: 3.0, height: 32}
        subjects:
          - name: dog
            references: [refs/dog/a.png]
            guidance_scale: 5.0
            width: 48
            prompts:
              - plain
              - {text: override, width: 16, negative_prompt: blurry, true_cfg_scale: 2.0}
        """
    )
    plain, override = load_manifest(path).subjects[0].prompts
    assert plain.params == SamplingParams(
        num_inference_steps=6, guidance_scale=5.0, height=32, width=48, reference_size=64
    )
    assert override.params.width == 16 and override.params.guidance_scale == 5.0
    assert override.params.negative_prompt == "blurry" and override.params.true_cfg_scale == 2.0


def test_references_are_sorted_and_deduplicated(refs, write_file, tmp_path):
    path = manifest_with(write_file).parent / "m.yaml"
    path.write_text(
        "version: 1\nrecipe: tiny\nsubjects:\n  - name: dog\n"
        "    references: [refs/dog/b.png, 'refs/*/*.png', refs/dog/a.png]\n    prompts: [x]\n"
    )
    (subject,) = load_manifest(path).subjects
    assert subject.references == tuple(
        str(tmp_path / p) for p in ("refs/cat/x.png", "refs/dog/a.png", "refs/dog/b.png")
    )


def test_output_dir_relative_to_manifest_and_string_shorthand(refs, write_file, tmp_path):
    path = manifest_with(write_file, top_extra="output: {dir: ../elsewhere, grids: false}")
    manifest = load_manifest(path)
    assert manifest.output_dir == tmp_path.parent / "elsewhere"
    assert manifest.document.output.grids is False and manifest.document.output.contact_sheet is True
    assert load_manifest(manifest_with(write_file, top_extra="output: out")).output_dir == tmp_path / "out"


def test_placeholder_escapes(refs, write_file):
    path = manifest_with(write_file, prompts="['{{literal}} {subject}']")
    assert load_manifest(path).subjects[0].prompts[0].text == "{literal} dog"


def test_yaml_anchors_and_merge_keys_work(refs, write_file):
    path = write_file(
        """
        version: 1
        recipe: tiny
        subjects:
          - &base
            name: dog
            references: [refs/dog/a.png]
            prompts: &prompts [one, two]
          - <<: *base
            name: dog2
            prompts: *prompts
        """
    )
    assert [len(s.prompts) for s in load_manifest(path).subjects] == [2, 2]


def test_model_from_manifest_without_recipe(refs, write_file):
    path = manifest_with(write_file).parent / "m.yaml"
    path.write_text(
        "version: 1\nmodel: {builtin: tiny, dtype: float32}\n"
        "subjects:\n  - {name: dog, references: [refs/dog/a.png], prompts: [x]}\n"
    )
    manifest = load_manifest(path)
    assert manifest.recipe is None and manifest.model.dtype == "float32"
    assert manifest.subjects[0].prompts[0].params == SamplingParams()


@pytest.mark.parametrize("example", sorted((REPO_ROOT / "examples").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_example_validates_and_plans(example):
    manifest = load_manifest(example)
    jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
    assert jobs


def test_demo_is_two_subjects_two_prompts_two_seeds():
    manifest = load_manifest(REPO_ROOT / "examples" / "demo.yaml")
    assert [s.name for s in manifest.subjects] == ["dog", "backpack"]
    assert all(len(s.prompts) == 2 and len(s.references) == 2 for s in manifest.subjects)
    assert manifest.num_jobs == 8
    assert manifest.model.builtin == "tiny"


def test_resolved_manifest_reproduces_the_plan(refs, write_file, tmp_path):
    manifest = load_manifest(write_file(VALID))
    resolved = write_file(manifest.resolved_yaml(), name="elsewhere/manifest.resolved.yaml")
    again = load_manifest(resolved)
    ids = [j.job_id for j in plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=100)]
    ids_again = [j.job_id for j in plan_jobs(again, model_identity=again.model_identity, max_jobs=100)]
    assert ids == ids_again
    assert again.output_dir == manifest.output_dir
    assert yaml.safe_load(resolved.read_text())["subjects"][0]["prompts"][1]["seeds"] == {
        "count": 3,
        "base": 10,
    }


def test_the_resolved_manifest_writes_what_prompts_share_once_and_plans_the_same_jobs(refs, write_file):
    """The parameters and seeds most prompts share go into `defaults`, each prompt says only what differs
    (with every value on every prompt, 100,000 prompts made 31 MB of YAML that status took a minute to
    read); a prompt without the shared step cache says `step_cache: null`, and sweeps stay labelled."""
    text = """
    version: 1
    recipe: tiny
    defaults:
      height: 64
      width: 64
      seeds: {count: 2}
      step_cache: {method: taylorseer}
    subjects:
      - name: dog
        class: dog
        references: [refs/dog/*.png]
        prompts:
          - a {class} in the snow
          - a {class} on the beach
          - text: a {class} without the cache
            step_cache: null
          - text: a {class} in a sweep
            guidance_scale: [2.0, 3.0]
            seeds: [7]
      - name: cat
        class: cat
        references: [refs/cat/*.png]
        prompts: ["a {class} in a box", "a {class} on a sofa"]
    """
    manifest = load_manifest(write_file(text))
    resolved_text = manifest.resolved_yaml()
    resolved = yaml.safe_load(resolved_text)
    assert resolved["defaults"]["step_cache"]["method"] == "taylorseer"
    assert resolved["defaults"]["seeds"] == {"count": 2, "base": 0}
    assert resolved_text.count("num_inference_steps") == 1 and resolved_text.count("taylorseer") == 1
    dog = resolved["subjects"][0]["prompts"]
    assert dog[0] == "a {class} in the snow"
    assert dog[2] == {"text": "a {class} without the cache", "step_cache": None}
    assert dog[3]["seeds"] == [7] and dog[3]["guidance_scale"] == [2.0]
    again = load_manifest(write_file(resolved_text, name="elsewhere/manifest.resolved.yaml"))

    def plan(loaded):
        return [(j.job_id, j.sweep) for j in plan_jobs(loaded, model_identity="m", max_jobs=100)]

    assert plan(again) == plan(manifest)
    assert again.resolved_yaml() == resolved_text  # a fixed point: a rerun's file is the same


# Locations and messages -----------------------------------------------------------------------------


def test_unknown_key_is_located_at_the_key_with_a_suggestion(refs, write_file):
    problem = only_problem(manifest_with(write_file, subject_extra="    guidance_scal: 3"))
    assert (problem.line, problem.column) == (9, 5)
    assert problem.field == "subjects[0].guidance_scal"
    assert problem.message == "unknown key `guidance_scal`"
    assert problem.hint == "did you mean `guidance_scale`?"
    assert str(problem).startswith(f"{problem.file}:9:5: subjects[0].guidance_scal: unknown key")


def test_size_not_multiple_of_16(refs, write_file):
    path = manifest_with(write_file, prompts="[{text: x, height: 500}]")
    problem = only_problem(path)
    assert problem.field == "subjects[0].prompts[0].height"
    assert (problem.line, problem.column) == (8, 33)
    assert "multiple of 16" in problem.message and problem.hint == "use 496"


@pytest.mark.parametrize(
    ("seeds", "field", "message"),
    [
        ("[0, -1]", "defaults.seeds[1]", "seeds must be integers in [0, 2**63 - 1], got -1"),
        (f"[{MAX_SEED + 1}]", "defaults.seeds[0]", "seeds must be integers in [0, 2**63 - 1]"),
        ("[1, 1]", "defaults.seeds", "seed 1 appears more than once"),
        ("[1.5]", "defaults.seeds[0]", "expected an integer, got 1.5"),
        ("['3']", "defaults.seeds[0]", "expected an integer, got '3'"),
        ("[]", "defaults.seeds", "must list at least one seed"),
        ("{count: 0}", "defaults.seeds", "`count` must be at least 1, got 0"),
        ("{count: 2, base: 9223372036854775807}", "defaults.seeds", "the last seed"),
        ("{count: 2, bsae: 1}", "defaults.seeds.bsae", "unknown key `bsae`"),
        ("7", "defaults.seeds", "expected a list of seeds or {count: N, base: B}, got 7"),
    ],
)
def test_bad_seeds(refs, write_file, seeds, field, message):
    problem = only_problem(manifest_with(write_file, top_extra=f"defaults:\n  seeds: {seeds}"))
    assert problem.field == field
    assert problem.line == 4
    assert message in problem.message


@pytest.mark.parametrize(
    ("value", "message", "hint"),
    [
        ("[0.5, 0.9]", "τ1 must be ≥ τ2, got [0.5, 0.9]", "swap them: [0.9, 0.5]"),
        ("[1.5, 0.2]", "both thresholds must be in [0, 1]", "the paper uses [0.95, 0.85]"),
        ("[0.9]", "must be a list of two numbers", "the paper uses [0.95, 0.85]"),
        ("0.9", "must be a list of two numbers", "the paper uses [0.95, 0.85]"),
    ],
)
def test_bad_stage_thresholds(refs, write_file, value, message, hint):
    problem = only_problem(manifest_with(write_file, top_extra=f"defaults: {{stage_thresholds: {value}}}"))
    assert problem.field == "defaults.stage_thresholds"
    assert (problem.line, problem.column) == (3, 30)
    assert message in problem.message and problem.hint == hint


def test_type_errors_are_described_in_yaml_terms(refs, write_file):
    path = manifest_with(
        write_file,
        top_extra="defaults: {num_inference_steps: '28', keep_mllm_condition: 1, guidance_scale: null}",
    )
    messages = {p.field: p.message for p in problems_of(path)}
    assert messages["defaults.num_inference_steps"] == "expected an integer, got '28'"
    assert messages["defaults.keep_mllm_condition"] == "expected true or false, got 1"
    assert messages["defaults.guidance_scale"] == "expected a value, got null"


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x" * 65, "", "a b", "a..b"])
def test_unsafe_subject_names(refs, write_file, name):
    path = write_file(
        f"version: 1\nrecipe: tiny\nsubjects:\n  - name: '{name}'\n"
        "    references: [refs/dog/a.png]\n    prompts: [x]\n"
    )
    problem = only_problem(path)
    assert problem.field == "subjects[0].name" and problem.line == 4
    assert "not usable as a folder name" in problem.message


@pytest.mark.parametrize(
    "name", ["index.jsonl", "shards", "run.json", "report.html", "metrics.json", "Manifest.Resolved.yaml"]
)
def test_reserved_subject_names_fail_validate(refs, write_file, squeeze, name):
    path = write_file(
        f"version: 1\nrecipe: tiny\nsubjects:\n  - name: '{name}'\n"
        "    references: [refs/dog/a.png]\n    prompts: [x]\n"
    )
    problem = only_problem(path)
    assert problem.field == "subjects[0].name" and problem.line == 4
    assert "cannot name a subject: squeeze writes its own" in problem.message
    assert squeeze("validate", str(path)).code == 2


def test_the_reserved_subject_names_are_the_output_folder_s():
    from squeeze_cli.manifest.schema import RESERVED_SUBJECT_NAMES
    from squeeze_cli.outputs.layout import RESERVED_NAMES

    assert RESERVED_SUBJECT_NAMES == RESERVED_NAMES


def test_duplicate_subject_names_ignore_case(refs, write_file):
    path = write_file(
        """
        version: 1
        recipe: tiny
        subjects:
          - {name: Dog, references: [refs/dog/a.png], prompts: [x]}
          - {name: dog, references: [refs/dog/a.png], prompts: [y]}
        """
    )
    problem = only_problem(path)
    assert (problem.field, problem.line) == ("subjects[1].name", 5)
    assert problem.message == "subject name 'dog' is already used by subjects[0]"


def test_placeholders(refs, write_file):
    path = write_file(
        """
        version: 1
        recipe: tiny
        subjects:
          - name: dog
            references: [refs/dog/a.png]
            prompts:
              - a {class}
              - text: a {colour} {subject}
        """
    )
    no_class, unknown = problems_of(path)
    assert (no_class.field, no_class.line) == ("subjects[0].prompts[0]", 7)
    assert no_class.message == "uses {class} but the subject has no class noun"
    assert no_class.hint == "add `class: <noun>` to it"
    assert (unknown.field, unknown.line, unknown.column) == ("subjects[0].prompts[1].text", 8, 15)
    assert unknown.message == "unknown placeholder {colour}"


def test_reference_problems(make_image, write_file, tmp_path):
    make_image("refs/ok.png")
    (tmp_path / "refs/folder").mkdir()
    (tmp_path / "refs/fake.png").write_bytes(b"not an image at all")
    path = write_file(
        """
        version: 1
        recipe: tiny
        subjects:
          - name: dog
            references:
              - refs/ok.png
              - refs/missing.png
              - refs/folder
              - refs/nothing/*.jpg
              - refs/fake.png
            prompts: [x]
        """
    )
    missing, folder, nothing, fake = problems_of(path)
    assert (missing.field, missing.line, missing.column) == ("subjects[0].references[1]", 7, 9)
    assert missing.message == "no such file: 'refs/missing.png'"
    assert "relative to the manifest's folder" in missing.hint
    assert folder.field == "subjects[0].references[2]" and folder.message == "'refs/folder' is not a file"
    assert folder.hint == "to use every image in it: 'refs/folder/*'"
    assert nothing.message == "no file matches 'refs/nothing/*.jpg'"
    assert (fake.field, fake.line) == ("subjects[0].references[4]", 10)
    assert fake.message.startswith("refs/fake.png: not a readable image")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixel data: enough for a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header(refs, write_file, tmp_path):
    (tmp_path / "refs/bomb.png").write_bytes(_png_header(100_000, 100_000))
    (tmp_path / "refs/big.png").write_bytes(_png_header(9000, 9000))  # under PIL's limit, over ours
    path = write_file(
        "version: 1\nrecipe: tiny\nsubjects:\n  - name: dog\n"
        "    references: [refs/bomb.png, refs/big.png]\n    prompts: [x]\n"
    )
    big, bomb = sorted(problems_of(path), key=lambda p: p.message)
    assert "more than" in bomb.message and bomb.field == "subjects[0].references[0]"
    assert "9000x9000" in big.message and big.field == "subjects[0].references[1]"


def test_yaml_syntax_problems(write_file):
    tabs = only_problem(write_file("version: 1\nsubjects:\n\t- name: x\n"))
    assert (tabs.line, tabs.column) == (3, 1) and "tabs" in tabs.hint
    python_tag = only_problem(write_file("version: 1\nsubjects: !!python/object/apply:os.system [ls]\n"))
    assert python_tag.line == 2 and "python/object/apply:os.system" in python_tag.message
    two_documents = only_problem(write_file("version: 1\n---\nversion: 1\n"))
    assert two_documents.line == 2
    empty = only_problem(write_file("# nothing\n"))
    assert empty.message == "the file is empty"
    not_mapping = only_problem(write_file("- a\n- b\n"))
    assert (not_mapping.line, not_mapping.field, not_mapping.message) == (
        1,
        "",
        "expected a mapping, got a list",
    )


def test_duplicate_keys(refs, write_file):
    path = write_file(
        """
        version: 1
        recipe: tiny
        subjects:
          - name: dog
            references: [refs/dog/a.png]
            prompts: [x]
            prompts: [y]
        """
    )
    problem = only_problem(path)
    assert (problem.line, problem.column, problem.field) == (7, 5, "subjects[0].prompts")
    assert problem.message == "duplicate key `prompts` (first set on line 6)"


def test_missing_keys_are_located_at_their_mapping(refs, write_file):
    path = write_file("recipe: tiny\nsubjects:\n  - name: dog\n    prompts: [x]\n")
    version, references = problems_of(path)
    assert (version.field, version.line) == ("", 1)
    assert version.message == "missing required key `version`" and "version: 1" in version.hint
    assert (references.field, references.line, references.column) == ("subjects[0]", 3, 5)
    assert references.message == "missing required key `references`"


def test_wrong_version(refs, write_file):
    problem = only_problem(
        write_file(
            "version: 2\nrecipe: tiny\nsubjects: [{name: a, references: [refs/dog/a.png], prompts: [x]}]\n"
        )
    )
    assert (problem.field, problem.line, problem.message) == ("version", 1, "unsupported manifest version 2")


def test_several_mistakes_are_all_reported_in_line_order(refs, write_file):
    path = write_file(
        """
        version: 1
        recipe: tiny
        defaults:
          height: 100
          seeds: [1, 1]
        subjects:
          - name: dog
            references: [refs/dog/a.png, refs/dog/nope.png]
            prompts:
              - a {klass}
              - text: ok
                widht: 64
          - name: ../cat
            references: [refs/cat/x.png]
            prompts: []
        """
    )
    problems = problems_of(path)
    located = [(p.line, p.field) for p in problems]
    assert located == [
        (4, "defaults.height"),
        (5, "defaults.seeds"),
        (8, "subjects[0].references[1]"),
        (10, "subjects[0].prompts[0]"),
        (12, "subjects[0].prompts[1].widht"),
        (13, "subjects[1].name"),
        (15, "subjects[1].prompts"),
    ]
    assert all(p.file == str(path) for p in problems)


def test_identical_prompts_are_flagged(refs, write_file):
    problem = only_problem(manifest_with(write_file, prompts="[same, other, same]"))
    assert problem.field == "subjects[0].prompts[2]"
    assert "same text, parameters and seeds as prompts[0]" in problem.message
    # Different seeds make them different images: fine.
    load_manifest(manifest_with(write_file, prompts="[same, {text: same, seeds: [5]}]"))


def test_true_cfg_needs_a_negative_prompt(refs, write_file):
    problem = only_problem(manifest_with(write_file, top_extra="defaults: {true_cfg_scale: 3.0}"))
    assert problem.field == "defaults.true_cfg_scale" and problem.line == 3
    assert "negative_prompt" in problem.message


# Recipes in manifests -------------------------------------------------------------------------------


def test_unknown_recipe_is_located_at_the_recipe_key(refs, write_file):
    path = manifest_with(write_file).parent / "m.yaml"
    path.write_text(
        "version: 1\nrecipe: tinny\nsubjects: [{name: a, references: [refs/dog/a.png], prompts: [x]}]\n"
    )
    problem = only_problem(path)
    assert (problem.line, problem.column, problem.field) == (2, 9, "recipe")
    assert problem.message == "unknown recipe 'tinny'" and "tiny" in problem.hint


def test_recipe_by_path_and_model_overrides(refs, write_file, tmp_path):
    write_file(
        """
        name: mine
        description: a local recipe
        model: {pipeline: ./weights/pipe, dtype: float16}
        defaults: {num_inference_steps: 9}
        """,
        name="presets/mine.yaml",
    )
    write_checkpoint_layout(tmp_path / "presets/weights/pipe")  # weights are checked to exist
    (tmp_path / "lora").mkdir()
    # A LoRA folder holds weights.
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(EMPTY_SAFETENSORS)
    path = manifest_with(write_file, top_extra="model: {lora: {path: ./lora, scale: 0.5}}").parent / "m.yaml"
    path.write_text(
        "version: 1\nrecipe: presets/mine.yaml\nmodel: {lora: {path: ./lora, scale: 0.5}}\n"
        "subjects: [{name: a, references: [refs/dog/a.png], prompts: [x]}]\n"
    )
    manifest = load_manifest(path)
    assert manifest.recipe.name == "mine"
    assert manifest.model.pipeline == str(tmp_path / "presets/weights/pipe")  # relative to the recipe file
    assert manifest.model.lora.path == str(tmp_path / "lora")  # relative to the manifest
    assert manifest.model.dtype == "float16"
    assert manifest.subjects[0].prompts[0].params.num_inference_steps == 9


def test_bad_model_override_is_located_in_the_manifest(refs, write_file):
    path = manifest_with(write_file, top_extra="model:\n  dtype: float64\n  lora: {path: x, scael: 1}")
    dtype, scale = problems_of(path)
    assert (dtype.field, dtype.line) == ("model.dtype", 4)
    assert "'float32', 'bfloat16' or 'float16'" in dtype.message
    assert (scale.field, scale.line) == ("model.lora.scael", 5)


def test_no_recipe_and_no_model(refs, write_file, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\nsubjects: [{name: a, references: [refs/dog/a.png], prompts: [x]}]\n")
    problem = only_problem(path)
    assert "neither `recipe` nor `model`" in problem.message and "recipe: tiny" in problem.hint


def test_recipe_flag_replaces_the_manifest_recipe(refs, write_file):
    path = manifest_with(write_file)
    problem = only_problem(path, recipe="nope")
    assert problem.file == "--recipe nope" and problem.field == "recipe"
    assert load_manifest(path, recipe="tiny").recipe.name == "tiny"


# Limits ---------------------------------------------------------------------------------------------


def test_job_limit(refs, write_file):
    path = manifest_with(write_file, top_extra="defaults: {seeds: {count: 1000}}")
    assert load_manifest(path).num_jobs == 1000
    problem = only_problem(path, max_jobs=999)
    assert problem.field == "subjects" and problem.line == 5
    assert problem.message == "the manifest plans 1,000 jobs, more than the limit of 999"
    assert "--max-jobs" in problem.hint
    with_limit = manifest_with(write_file, top_extra="max_jobs: 10\ndefaults: {seeds: {count: 1000}}")
    assert "limit of 10" in only_problem(with_limit).message
    assert load_manifest(with_limit, max_jobs=1000).max_jobs == 1000  # the flag beats the manifest


def test_huge_seed_counts_are_refused_without_being_expanded(refs, write_file):
    path = manifest_with(write_file, top_extra="defaults: {seeds: {count: 1000000000000}}")
    assert "1,000,000,000,000 jobs" in only_problem(path).message


# --set overrides ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("defaults.seeds=[0, 1]", ("defaults", "seeds"), [0, 1]),
        ("subjects.0.prompts.1=a dog", ("subjects", 0, "prompts", 1), "a dog"),
        ("output.grids=false", ("output", "grids"), False),
        ("defaults.negative_prompt=", ("defaults", "negative_prompt"), None),
        ("max_jobs=5=6", ("max_jobs",), "5=6"),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1", "a=[unclosed"])
def test_parse_override_rejects(text):
    with pytest.raises(ValueError):
        parse_override(text)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("defaults.seeds=[0,1", "close every `[` and `{`"),
        ("subjects.0.prompts=[a {class}]", "close every `[` and `{`"),
        ('subjects.0.class="dog', "close its quotes, or quote text"),
        # The shell took the user's quotes: the example is their own value, quoted for YAML.
        ("subjects.0.prompts.1={class} at night", """`--set 'subjects.0.prompts.1="{class} at night"'`"""),
        ("defaults.seeds=!!python/object/apply:os.system [x]", "remove the tag"),
    ],
)
def test_overrides_that_are_not_yaml_say_how_to_write_them(refs, write_file, text, hint):
    problem = only_problem(manifest_with(write_file), [text])
    assert problem.file == f"--set {text}" and problem.message.startswith("the value is not valid YAML")
    assert hint in problem.hint


def test_overrides_apply_before_validation(refs, write_file):
    path = manifest_with(write_file, prompts="[a, b]")
    manifest = load_manifest(
        path, ["defaults.height=32", "subjects.0.prompts.1={text: c, seeds: [4]}", "subjects.0.name=hound"]
    )
    (subject,) = manifest.subjects
    assert subject.name == "hound"
    assert [p.text for p in subject.prompts] == ["a", "c"]
    assert subject.prompts[0].params.height == 32 and tuple(subject.prompts[1].seeds) == (4,)


def test_bad_overrides_are_located_at_the_flag(refs, write_file):
    path = manifest_with(write_file)
    syntax, index, value = problems_of(path, ["oops", "subjects.5.name=x", "defaults.height=33"])
    assert (syntax.file, syntax.line, syntax.message) == ("--set oops", None, "expected `dotted.path=value`")
    assert index.file == "--set subjects.5.name=x"
    assert index.message == "index 5 is out of range: subjects has 1 item"
    assert (value.file, value.field) == ("--set defaults.height=33", "defaults.height")
    assert "multiple of 16" in value.message
    assert str(value).startswith("--set defaults.height=33: defaults.height: must be")


def test_a_key_an_override_creates_is_located_at_the_flag(refs, write_file):
    # `default` exists only through the flag: the file's first line is no place to report it.
    path = manifest_with(write_file)
    unknown = only_problem(path, ["default.height=64"])
    assert (unknown.file, unknown.line, unknown.field) == ("--set default.height=64", None, "default")
    assert unknown.message == "unknown key `default`" and unknown.hint == "did you mean `defaults`?"
    missing = only_problem(path, ["model.lora.scale=1"])
    assert (missing.file, missing.field) == ("--set model.lora.scale=1", "model.lora")
    assert missing.message == "missing required key `path`"


def test_format_field_path():
    assert format_field_path(("subjects", 2, "prompts", 0, "seeds")) == "subjects[2].prompts[0].seeds"
    assert format_field_path(()) == ""


def test_unreadable_manifest(tmp_path):
    problem = only_problem(tmp_path / "missing.yaml")
    assert problem.message.startswith("cannot read the manifest")


def test_the_docs_name_every_packaged_recipe():
    from squeeze_cli.manifest.recipes import list_recipes

    text = (REPO_ROOT / "docs" / "manifest.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `recipe` |"))
    named = set(row.split("`")[1::2])  # the names in backticks
    assert {recipe.name for recipe in list_recipes()} <= named


def test_the_documented_example_is_valid(make_image, tmp_path):
    text = (REPO_ROOT / "docs" / "manifest.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    for reference in (
        "photos/backpack/a.jpg",
        "extra/backpack-side.png",
        "photos/dog/00.jpg",
        "photos/dog/01.jpg",
    ):
        make_image(reference)
    path = tmp_path / "manifest.yaml"
    path.write_text(example)
    manifest = load_manifest(path, check_sources=False)  # the example's weights are not on this machine
    assert manifest.num_jobs == 14
    assert manifest.model.components["aggregator"].path == str(tmp_path / "weights/my-aggregator")
    assert manifest.model.components["mllm"].path == "OpenGVLab/InternVL3-8B-hf"
    assert manifest.model.lora.path == str(tmp_path / "weights/my-lora") and manifest.model.lora.scale == 0.9


def test_alias_bombs_are_refused(write_file, monkeypatch):
    import squeeze_cli.manifest.located as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_YAML_NODES", 1000)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    problem = only_problem(write_file("\n".join(levels) + "\n"))
    assert "too many nodes" in problem.message
