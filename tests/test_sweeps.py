"""Sweeps: a list value for a sampling key plans one job per value (the cartesian product for several keys),
as A1111's X/Y/Z plot; a manifest without lists plans the job ids it always did, and the swept values
label the grids."""

from __future__ import annotations

import json

import pytest
from support import TWO_PROMPTS

from squeeze_cli.manifest.loaded import SWEEP_LABELS
from squeeze_cli.manifest.schema import SWEPT_KEYS
from squeeze_cli.outputs.layout import image_name
from squeeze_cli.outputs.views import plan_views

# TWO_PROMPTS with explicit thresholds: every swept key is set at the defaults level.
NO_SWEEP = TWO_PROMPTS.replace(
    "  num_inference_steps: 2\n", "  num_inference_steps: 2\n  stage_thresholds: [0.9, 0.8]\n"
)
# Its job ids as squeeze planned them before sweeps existed (squeeze 0.1.x, job id scheme v2).
NO_SWEEP_IDS = ["188ac5934339ece0", "c2895fdf77f09998", "0f269e5a41492a58", "bedb43c401b9bcca"]


def test_a_manifest_without_lists_plans_the_same_job_ids(make_project, plan_of) -> None:
    project = make_project(m=NO_SWEEP)
    jobs = plan_of(project / "m.yaml")
    assert [job.job_id for job in jobs] == NO_SWEEP_IDS
    assert [image_name(job) for job in jobs] == [
        "dog/000-s0.png",
        "dog/000-s1.png",
        "dog/001-s0.png",
        "dog/001-s1.png",
    ]
    assert {job.sweep for job in jobs} == {""}


def test_a_sweep_plans_the_jobs_of_its_values_written_one_by_one(make_project, plan_of) -> None:
    swept = NO_SWEEP.replace(
        '"a {class} at sea"]',
        '{text: "a {class} at sea", guidance_scale: [2.5, 3.5], num_inference_steps: [2, 3]}]',
    )
    written_out = NO_SWEEP.replace(
        '"a {class} at sea"]',
        "\n".join(
            f'{{text: "a {{class}} at sea", guidance_scale: {g}, num_inference_steps: {n}}},'
            for n in (2, 3)  # the first swept key (in SWEPT_KEYS' order) varies slowest
            for g in (2.5, 3.5)
        ).join(["\n      ", "\n    ]"]),
    ).replace('prompts: ["a {class} in the snow", ', 'prompts: ["a {class} in the snow",')
    project = make_project(swept=swept, written=written_out)
    jobs, expected = plan_of(project / "swept.yaml"), plan_of(project / "written.yaml")
    assert [job.job_id for job in jobs] == [job.job_id for job in expected]
    assert [job.job_id for job in jobs[:2]] == NO_SWEEP_IDS[:2]  # the unswept prompt's jobs are unchanged
    assert len({image_name(job) for job in jobs}) == len(jobs) == 2 + 2 * 2 * 2
    assert [job.sweep for job in jobs[2::2]] == [
        "steps=2 guidance=2.5",
        "steps=2 guidance=3.5",
        "steps=3 guidance=2.5",
        "steps=3 guidance=3.5",
    ]


def test_a_thresholds_sweep_is_a_list_of_pairs(make_project, plan_of) -> None:
    project = make_project(
        m=NO_SWEEP.replace("stage_thresholds: [0.9, 0.8]", "stage_thresholds: [[0.9, 0.8], [0.95, 0.85]]")
    )
    jobs = plan_of(project / "m.yaml")
    assert [(job.prompt_index, job.params.stage_thresholds, job.sweep) for job in jobs[::2]] == [
        (0, (0.9, 0.8), "τ=0.9,0.8"),
        (1, (0.95, 0.85), "τ=0.95,0.85"),
        (2, (0.9, 0.8), "τ=0.9,0.8"),
        (3, (0.95, 0.85), "τ=0.95,0.85"),
    ]
    assert [job.job_id for job in jobs if job.sweep == "τ=0.9,0.8"] == NO_SWEEP_IDS


def test_the_resolved_manifest_plans_the_same_labelled_jobs(make_project, plan_of, squeeze) -> None:
    from squeeze_cli.manifest import load_manifest

    project = make_project(m=NO_SWEEP.replace("num_inference_steps: 2", "num_inference_steps: [2, 3]"))
    loaded = load_manifest(project / "m.yaml")
    (project / "resolved.yaml").write_text(loaded.resolved_yaml())
    jobs, again = plan_of(project / "m.yaml"), plan_of(project / "resolved.yaml")
    assert [(job.job_id, job.sweep) for job in again] == [(job.job_id, job.sweep) for job in jobs]


def test_grids_lead_with_the_swept_values(make_project, plan_of, tmp_path) -> None:
    project = make_project(
        m=NO_SWEEP.replace("  height: 32\n", "  height: 32\n  guidance_scale: [2.5, 3.5]\n")
    )
    pages = plan_views(tmp_path / "out", plan_of(project / "m.yaml"), {})
    captions = [prompt.prompt for page in pages for prompt in page.prompts]
    assert captions == [
        "[guidance=2.5]  a dog in the snow",
        "[guidance=3.5]  a dog in the snow",
        "[guidance=2.5]  a dog at sea",
        "[guidance=3.5]  a dog at sea",
    ]


@pytest.mark.parametrize(
    ("setting", "key", "message"),
    [
        ("guidance_scale: [2.5, -1.0]", "guidance_scale[1]", "must be a number ≥ 0, got -1.0"),
        ("num_inference_steps: [4, 4]", "num_inference_steps", "4 appears more than once in the sweep"),
        ("num_inference_steps: []", "num_inference_steps", "empty"),
        ("num_inference_steps: [4, 2.5]", "num_inference_steps[1]", "expected an integer"),
        ("stage_thresholds: [[0.9, 0.8], 0.5]", "stage_thresholds[1]", "must be a list of two numbers"),
        ("stage_thresholds: [[0.8, 0.9]]", "stage_thresholds[0]", "τ1 must be ≥ τ2"),
        ("height: [32, 64]", "height", "expected an integer"),
    ],
)
def test_a_bad_sweep_is_a_located_error(make_project, squeeze, setting: str, key: str, message: str) -> None:
    project = make_project(
        m=NO_SWEEP.replace('"a {class} at sea"]', f'{{text: "a {{class}} at sea", {setting}}}]')
    )
    result = squeeze("validate", str(project / "m.yaml"), "--json")
    assert result.code == 2, result.out
    problems = json.loads(result.out)["problems"]
    field = f"subjects[0].prompts[1].{key}"
    assert [(p["field"], message in p["message"], p["line"]) for p in problems] == [(field, True, 13)], (
        problems
    )


def test_a_sweep_larger_than_the_job_limit_is_refused_before_it_is_built(make_project, squeeze) -> None:
    values = ", ".join(str(n) for n in range(1, 101))
    sweep = f"  num_inference_steps: [{values}]\n  guidance_scale: [{values}]\n"
    project = make_project(m=NO_SWEEP.replace("  num_inference_steps: 2\n", sweep))
    result = squeeze("validate", str(project / "m.yaml"), "--max-jobs", "5000")
    assert result.code == 2
    assert "its sweeps make 10,000 sets of parameters, more than the job limit of 5,000" in result.err


def test_every_swept_key_has_a_label() -> None:
    assert tuple(SWEEP_LABELS) == SWEPT_KEYS


def test_a_sweep_over_feed_subjects_is_refused_where_it_is_set(make_project, squeeze) -> None:
    # Feed subjects (`subjects_from`) take one value per key for now: a sweep is a located error, not
    # lists passed on to the pipeline.
    project = make_project(
        m="""\
version: 1
recipe: tiny
defaults: {height: 32, width: 32, num_inference_steps: [2, 3]}
subjects_from:
  path: products.csv
  name: sku
  references: images
  scenes:
    - a photo of {subject}
"""
    )
    (project / "products.csv").write_text("sku,images\nTP-1,images/dog/00.jpg\n")
    result = squeeze("validate", str(project / "m.yaml"), "--json")
    assert result.code == 2, result.out
    problems = json.loads(result.out)["problems"]
    assert [(p["field"], p["message"]) for p in problems] == [
        (
            "defaults.num_inference_steps",
            "a sweep (a list of values) is not available with `subjects_from` yet",
        )
    ]


@pytest.mark.slow
def test_a_swept_run_resumes_and_its_status_is_complete(make_project, squeeze) -> None:
    project = make_project(m=TWO_PROMPTS.replace("num_inference_steps: 2", "num_inference_steps: [1, 2]"))
    first = squeeze("gen", str(project / "m.yaml"))
    assert first.code == 0, first.err
    out = project / "squeeze-out"
    assert sorted(p.name for p in (out / "dog").glob("grid-*.png")) == [f"grid-00{i}.png" for i in range(4)]
    again = squeeze("gen", str(project / "m.yaml"), "--json")
    summary = [json.loads(line) for line in again.out.splitlines()][-1]
    assert again.code == 0 and summary["jobs"]["skipped"] == 8, again.out
    status = squeeze("status", str(out), "--json")  # plans from manifest.resolved.yaml
    assert status.code == 0 and json.loads(status.out)["jobs"] == {
        "planned": 8,
        "done": 8,
        "failed": 0,
        "pending": 0,
    }
