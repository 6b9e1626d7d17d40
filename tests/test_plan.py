from __future__ import annotations

import dataclasses
import hashlib

import pytest

from squeeze_cli.errors import ManifestError
from squeeze_cli.manifest import reference_facts
from squeeze_cli.manifest.reference_facts import file_digest
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.params import StepCache
from squeeze_cli.pipelines import cost as cost_model
from squeeze_cli.pipelines.registry import PIPELINES
from squeeze_cli.plan import (
    Job,
    SamplingParams,
    job_id,
    plan_jobs,
    shard_boundaries,
    shard_jobs,
)

BASE = """
version: 1
recipe: tiny
output: {dir: out}
defaults: {seeds: [0, 1]}
subjects:
  - name: dog
    class: dog
    references: [refs/dog/*.png]
    prompts:
      - a {class} in the snow
      - text: a {class} on the beach
        seeds: [5]
  - name: can
    class: can
    references: [refs/can.png]
    prompts: ["a {class} on a table"]
"""


@pytest.fixture
def refs(make_image):
    make_image("refs/dog/1.png", color=(10, 20, 30))
    make_image("refs/dog/2.png", color=(40, 50, 60))
    make_image("refs/can.png", color=(70, 80, 90))


def plan_text(write_file, text: str, *, model: str | None = None, **kwargs) -> list[Job]:
    manifest = load_manifest(write_file(text), **kwargs)
    return plan_jobs(manifest, model_identity=model or manifest.model_identity, max_jobs=1000)


def ids_by_key(jobs: list[Job]) -> dict[tuple[str, int], str]:
    return {(job.prompt, job.seed): job.job_id for job in jobs}


def test_jobs_are_ordered_by_subject_prompt_seed(refs, write_file, tmp_path):
    jobs = plan_text(write_file, BASE)
    assert [(j.subject, j.prompt_index, j.seed) for j in jobs] == [
        ("dog", 0, 0),
        ("dog", 0, 1),
        ("dog", 1, 5),
        ("can", 0, 0),
        ("can", 0, 1),
    ]
    assert [j.index for j in jobs] == list(range(5))
    assert [j.subject_index for j in jobs] == [0, 0, 0, 1, 1]
    first = jobs[0]
    assert first.prompt == "a dog in the snow" and first.class_noun == "dog"
    assert first.references == (str(tmp_path / "refs/dog/1.png"), str(tmp_path / "refs/dog/2.png"))
    assert first.params == SamplingParams(num_inference_steps=4, height=64, width=64, reference_size=64)
    assert len(first.job_id) == 16 and int(first.job_id, 16) >= 0
    assert len({j.job_id for j in jobs}) == 5


def test_sampling_params_map_onto_the_pipeline_arguments():
    params = SamplingParams(stage_thresholds=(0.9, 0.5), negative_prompt="blurry")
    assert params.to_pipeline_kwargs() == {
        "num_inference_steps": 28,
        "guidance_scale": 2.5,
        "height": 512,
        "width": 512,
        "stage_thresholds": (0.9, 0.5),
        "keep_mllm_condition": False,
        "true_cfg_scale": 1.0,
        "negative_prompt": "blurry",
        "reference_size": 512,
        "step_cache": None,
    }
    assert params.to_dict()["stage_thresholds"] == [0.9, 0.5]


# Job ids: unchanged by what does not change pixels -------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("output: {dir: out}", "output: {dir: other, grids: false}"),  # output settings
        ("version: 1", "# a comment\nversion: 1\nmax_jobs: 500"),  # comments, limits
        ("defaults: {seeds: [0, 1]}", "defaults:\n  seeds:\n    - 0\n    - 1"),  # reformatted
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: {count: 2, base: 0}}"),  # same seeds, other form
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], height: 64}"),  # restates the recipe
        ("references: [refs/dog/*.png]", "references: [refs/dog/2.png, refs/dog/1.png]"),  # same files
        ("a {class} in the snow", "a dog in the snow"),  # same resolved prompt
        ("    class: can\n", "    class: can\n    guidance_scale: 2.5\n"),  # restates the default
    ],
)
def test_job_ids_ignore_what_does_not_change_pixels(refs, write_file, old, new):
    assert old in BASE
    before = [j.job_id for j in plan_text(write_file, BASE)]
    after = [j.job_id for j in plan_text(write_file, BASE.replace(old, new))]
    assert after == before


def test_job_ids_include_the_subject_so_identical_subjects_do_not_collide(refs, write_file):
    # Same references, prompt and seeds in two subjects: two places on disk, so two jobs each.
    twin = (
        BASE
        + """  - name: can2
    class: can
    references: [refs/can.png]
    prompts: ["a {class} on a table"]
"""
    )
    jobs = plan_text(write_file, twin)
    assert len({job.job_id for job in jobs}) == len(jobs)
    renamed = plan_text(write_file, BASE.replace("- name: dog", "- name: hound"))
    assert [j.job_id for j in renamed][:3] != [j.job_id for j in plan_text(write_file, BASE)][:3]


def test_job_ids_ignore_the_order_of_subjects(refs, write_file):
    dog, can = BASE.split("  - name: can\n")
    swapped = dog.split("subjects:\n")[0] + "subjects:\n  - name: can\n" + can + dog.split("subjects:\n")[1]
    before = {(j.subject, j.prompt, j.seed): j.job_id for j in plan_text(write_file, BASE)}
    after = {(j.subject, j.prompt, j.seed): j.job_id for j in plan_text(write_file, swapped)}
    assert before == after


def test_job_ids_ignore_other_prompts_and_their_order(refs, write_file):
    before = ids_by_key(plan_text(write_file, BASE))
    reordered = BASE.replace(
        "      - a {class} in the snow\n      - text: a {class} on the beach\n        seeds: [5]\n",
        "      - a {class} wearing a hat\n      - text: a {class} on the beach\n        seeds: [5]\n"
        "      - a {class} in the snow\n",
    )
    after = ids_by_key(plan_text(write_file, reordered))
    for key, value in before.items():
        assert after[key] == value


def test_job_ids_ignore_where_the_references_live(refs, write_file, tmp_path, make_image):
    before = ids_by_key(plan_text(write_file, BASE))
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved/a.png").write_bytes((tmp_path / "refs/dog/1.png").read_bytes())
    (tmp_path / "moved/b.png").write_bytes((tmp_path / "refs/dog/2.png").read_bytes())
    after = ids_by_key(plan_text(write_file, BASE.replace("refs/dog/*.png", "moved/*.png")))
    assert after == before


# ... and changed by everything that does ------------------------------------------------------------


def test_job_ids_change_with_reference_bytes(refs, write_file, make_image):
    before = ids_by_key(plan_text(write_file, BASE))
    make_image("refs/dog/2.png", color=(41, 50, 60))
    after = ids_by_key(plan_text(write_file, BASE))
    assert all(after[k] != before[k] for k in before if k[0].startswith("a dog"))
    assert all(after[k] == before[k] for k in before if k[0].startswith("a can"))


def test_job_ids_change_with_reference_order_and_count(refs, write_file):
    before = ids_by_key(plan_text(write_file, BASE))
    fewer = ids_by_key(plan_text(write_file, BASE.replace("refs/dog/*.png", "refs/dog/1.png")))
    assert fewer[("a dog in the snow", 0)] != before[("a dog in the snow", 0)]


def test_job_ids_change_with_the_prompt_only_for_that_prompt(refs, write_file):
    before = plan_text(write_file, BASE)
    after = plan_text(write_file, BASE.replace("a {class} in the snow", "a {class} in the rain"))
    assert [a.job_id != b.job_id for a, b in zip(before, after, strict=True)] == [
        True,
        True,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], num_inference_steps: 5}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], guidance_scale: 3.0}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], height: 80}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], width: 80}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], stage_thresholds: [0.9, 0.8]}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], keep_mllm_condition: true}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], negative_prompt: blurry}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], negative_prompt: x, true_cfg_scale: 2}"),
        ("defaults: {seeds: [0, 1]}", "defaults: {seeds: [0, 1], reference_size: 128}"),
        ("recipe: tiny", "recipe: tiny\nmodel: {dtype: bfloat16}"),
        ("recipe: tiny", "recipe: tiny\nmodel: {family: qwen2_5_vl}"),
    ],
)
def test_job_ids_change_with_every_pixel_relevant_input(refs, write_file, old, new):
    before = plan_text(write_file, BASE)
    after = plan_text(write_file, BASE.replace(old, new))
    assert [(j.prompt, j.seed) for j in after] == [(j.prompt, j.seed) for j in before]
    assert not {j.job_id for j in before} & {j.job_id for j in after}


def test_job_id_hashes_each_input():
    digests = [hashlib.sha256(b"a").digest()]
    base = job_id("dog", digests, "a dog", 3, SamplingParams(), "model")
    assert base == job_id("dog", list(digests), "a dog", 3, SamplingParams(), "model")
    assert job_id("dog2", digests, "a dog", 3, SamplingParams(), "model") != base
    assert job_id("dog", [hashlib.sha256(b"b").digest()], "a dog", 3, SamplingParams(), "model") != base
    assert job_id("dog", digests, "a dog ", 3, SamplingParams(), "model") != base
    assert job_id("dog", digests, "a dog", 4, SamplingParams(), "model") != base
    assert job_id("dog", digests, "a dog", 3, SamplingParams(), "model2") != base
    changed = {
        "num_inference_steps": 27,
        "guidance_scale": 2.0,
        "height": 496,
        "width": 496,
        "stage_thresholds": (0.95, 0.8),
        "keep_mllm_condition": True,
        "true_cfg_scale": 1.5,
        "negative_prompt": "",
        "reference_size": 256,
        "step_cache": StepCache(),
    }
    assert set(changed) == {f.name for f in dataclasses.fields(SamplingParams)}
    for name, value in changed.items():
        params = dataclasses.replace(SamplingParams(), **{name: value})
        assert job_id("dog", digests, "a dog", 3, params, "model") != base, name


def test_plan_ids_match_the_job_id_function(refs, write_file):
    job = plan_text(write_file, BASE)[0]
    digests = [file_digest(path) for path in job.references]
    assert job.job_id == job_id(
        job.subject, digests, job.prompt, job.seed, job.params, load_model_identity(write_file)
    )


def load_model_identity(write_file) -> str:
    return load_manifest(write_file(BASE)).model_identity


def test_model_identity_argument_changes_ids(refs, write_file):
    first = plan_text(write_file, BASE, model="aaaa")
    second = plan_text(write_file, BASE, model="bbbb")
    assert all(a.job_id != b.job_id for a, b in zip(first, second, strict=True))


def test_each_reference_file_is_hashed_once_per_load_and_plan(refs, write_file, monkeypatch):
    hashed: list[str] = []
    real_digest = reference_facts.file_digest
    monkeypatch.setattr(reference_facts, "file_digest", lambda path: hashed.append(path) or real_digest(path))
    text = BASE.replace("defaults: {seeds: [0, 1]}", "defaults: {seeds: {count: 50}}")
    manifest = load_manifest(write_file(text))
    jobs = plan_jobs(manifest, model_identity="m", max_jobs=1000)
    assert len(jobs) == 101
    assert sorted(hashed) == sorted({p for job in jobs for p in job.references})


def test_plan_refuses_more_jobs_than_the_limit(refs, write_file):
    manifest = load_manifest(write_file(BASE))
    with pytest.raises(ManifestError) as info:
        plan_jobs(manifest, model_identity="m", max_jobs=4)
    assert "5 jobs, more than the limit of 4" in info.value.problems[0].message


SQUEEZE = PIPELINES["squeeze"]


def estimate_cost(params: SamplingParams, num_references: int, prompt: str = "", **step_tokens) -> float:
    """The squeeze pipeline's cost model, its step tokens changed by `step_tokens`."""
    tokens = dataclasses.replace(SQUEEZE.step_tokens, **step_tokens)
    return cost_model.estimate_cost(params, num_references, prompt, tokens=tokens, staged=SQUEEZE.staged)


def test_cost_grows_with_size_steps_and_references():
    base = estimate_cost(SamplingParams(), 1)
    assert estimate_cost(SamplingParams(height=512, width=512, reference_size=512), 1) == pytest.approx(1.0)
    assert estimate_cost(SamplingParams(), 2) > base
    assert estimate_cost(SamplingParams(num_inference_steps=56), 1) == pytest.approx(2 * base, rel=0.05)
    # Attention makes a 1024² image more than 4x a 512² one.
    assert estimate_cost(SamplingParams(height=1024, width=1024, reference_size=1024), 1) > 4 * base
    assert estimate_cost(SamplingParams(true_cfg_scale=2.0, negative_prompt=""), 1) == pytest.approx(2 * base)


def test_cost_counts_the_condition_tokens_each_stage_runs_on():
    params = SamplingParams()
    one, four = estimate_cost(params, 1), estimate_cost(params, 4)
    # More than the references' pixels alone say ((1 + 4) / (1 + 1) = 2.5): each reference also brings
    # MLLM condition tokens, and attention grows with the square of the sequence.
    assert four / one > 2.5
    assert estimate_cost(params, 1, "a dog " * 40) > estimate_cost(params, 1, "a dog")
    # Stage 3's null condition is shorter than the MLLM's, unless the MLLM condition is kept.
    assert estimate_cost(SamplingParams(keep_mllm_condition=True), 1) > one
    # Without the stage plan every step runs on references and condition: more tokens per image.
    token_steps = {
        staged: cost_model._token_steps(params, 1, 0, staged, SQUEEZE.step_tokens) for staged in (0, 1)
    }
    assert token_steps[False] > token_steps[True]
    # Costs are in units of the same model's one-reference image; MLLM tokens make references dearer.
    longer = {"condition_tokens_per_reference": 512}
    assert estimate_cost(params, 4, **longer) / estimate_cost(params, 1, **longer) > four / one


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_costs_its_own_tokens(name):
    """Each registered pipeline has a cost model in its registry row: 1 at the unit, more with references
    and size, twice with true CFG; a padded text encoder's prompt length costs nothing more."""
    spec = PIPELINES[name]
    unit = SamplingParams(height=512, width=512, reference_size=512)
    assert spec.estimate_cost(unit, 1) == pytest.approx(1.0)
    assert spec.estimate_cost(unit, 2) > spec.estimate_cost(unit, 1)
    assert spec.estimate_cost(dataclasses.replace(unit, height=1024, width=1024), 1) > 2.0
    cfg = dataclasses.replace(unit, true_cfg_scale=2.0, negative_prompt=" ")
    assert spec.estimate_cost(cfg, 1) == pytest.approx(2.0)
    longer = spec.estimate_cost(unit, 1, "a dog " * 40) > spec.estimate_cost(unit, 1, "a dog")
    assert longer == spec.step_tokens.counts_instruction


def test_plan_costs_jobs_with_the_recipe_pipeline(refs, write_file):
    """A job's cost comes from its recipe's pipeline: the same manifest costs differently under Kontext
    (a fixed 512-token T5 condition, references in every step) than under the squeeze pipeline."""
    costs = {}
    for recipe, name in (("tiny", "squeeze"), ("tiny-kontext", "kontext")):
        manifest = load_manifest(write_file(BASE.replace("recipe: tiny", f"recipe: {recipe}")))
        jobs = plan_jobs(manifest, model_identity="m", max_jobs=100)
        for job in jobs:
            expected = PIPELINES[name].estimate_cost(job.params, len(job.references), job.prompt)
            assert job.cost == pytest.approx(expected)
        costs[name] = [job.cost for job in jobs]
    assert costs["squeeze"] != pytest.approx(costs["kontext"])


# Sharding -------------------------------------------------------------------------------------------


def make_jobs(costs_per_subject: list[list[float]]) -> list[Job]:
    jobs = []
    for subject_index, costs in enumerate(costs_per_subject):
        for cost in costs:
            index = len(jobs)
            jobs.append(
                Job(
                    index,
                    f"{index:016x}",
                    f"s{subject_index}",
                    subject_index,
                    None,
                    0,
                    "p",
                    index,
                    SamplingParams(),
                    (),
                    cost,
                )
            )
    return jobs


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 30])
@pytest.mark.parametrize(
    "layout",
    [[[1.0] * 10], [[1.0] * 4] * 4, [[1.0] * 9, [1.0], [2.0] * 3], [[0.5, 3.0, 1.0], [1.0] * 7], []],
)
def test_shards_partition_the_plan(layout, count):
    jobs = make_jobs(layout)
    shards = [shard_jobs(jobs, index, count) for index in range(count)]
    assert [job for shard in shards for job in shard] == jobs  # in order, no duplicates, no padding
    assert shards == [shard_jobs(jobs, index, count) for index in range(count)]  # deterministic


def test_equal_subjects_stay_whole():
    jobs = make_jobs([[1.0] * 5] * 4)
    for count in (2, 4):
        shards = [shard_jobs(jobs, index, count) for index in range(count)]
        assert all(len({job.subject for job in shard}) == 4 // count for shard in shards)


def test_one_big_subject_is_split_evenly():
    jobs = make_jobs([[1.0] * 12])
    assert [len(shard_jobs(jobs, index, 4)) for index in range(4)] == [3, 3, 3, 3]


def test_shards_balance_cost_not_job_count():
    jobs = make_jobs([[4.0] * 2, [1.0] * 8])  # two expensive jobs, eight cheap ones
    first, second = (shard_jobs(jobs, index, 2) for index in range(2))
    assert sum(j.cost for j in first) == sum(j.cost for j in second) == 8.0
    assert len(first) == 2 and len(second) == 8


def test_cut_snaps_to_a_nearby_subject_boundary():
    # The fair cut is at cost 10.5, inside subject 1; the boundary at 10 is close enough to take.
    jobs = make_jobs([[1.0] * 10, [1.0] * 11])
    first = shard_jobs(jobs, 0, 2)
    assert {job.subject for job in first} == {"s0"}
    assert shard_boundaries([1.0] * 21, [0] * 10 + [1] * 11, 2) == [0, 10, 21]


def test_more_shards_than_jobs_leaves_some_empty():
    jobs = make_jobs([[1.0] * 3])
    shards = [shard_jobs(jobs, index, 5) for index in range(5)]
    assert sorted(len(shard) for shard in shards) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(("index", "count"), [(0, 0), (2, 2), (-1, 2)])
def test_shard_arguments_are_checked(index, count):
    with pytest.raises(ValueError):
        shard_jobs(make_jobs([[1.0]]), index, count)


def test_a_reference_swapped_for_a_fifo_after_validation_is_a_problem_not_a_hang(refs, write_file, tmp_path):
    import os

    manifest = load_manifest(write_file(BASE))
    checked = plan_jobs(manifest, model_identity="m", max_jobs=1000)
    fifo = manifest.subjects[1].references[0]
    os.unlink(fifo)
    os.mkfifo(fifo)
    # The plan hashes what validation checked (read once, at the check): the FIFO is never opened here.
    assert plan_jobs(manifest, model_identity="m", max_jobs=1000) == checked
    # A reference the load did not read is read by the plan: a FIFO there is a located problem.
    unread = dataclasses.replace(manifest, reference_facts=reference_facts.ReferenceFacts())
    with pytest.raises(ManifestError) as info:
        plan_jobs(unread, model_identity="m", max_jobs=1000)
    problem = info.value.problems[0]
    assert problem.field == "subjects[1].references" and "not a regular file (a FIFO" in problem.message
