"""The stage plan: FLUX's σ schedule reproduced exactly, and the stage of each step."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from squeeze_cli.pipelines.stages import (
    DEFAULT_SCHEDULER_CONFIG,
    StagePlan,
    _shifted_sigma,
    calculate_shift,
    stage_plan,
    time_shift,
)


def test_paper_default_28_steps_512():
    plan = stage_plan(28, 512, 512, (0.95, 0.85))
    assert plan.counts == (3, 4, 21)
    assert plan.stages[:3] == (1, 1, 1)
    assert plan.stages[3:7] == (2, 2, 2, 2)
    assert set(plan.stages[7:]) == {3}
    assert plan.mu == pytest.approx(0.63)


@pytest.mark.parametrize(
    ("size", "steps", "counts"),
    [(512, 20, (2, 3, 15)), (512, 50, (5, 8, 37)), (1024, 28, (4, 7, 17)), (1024, 50, (8, 10, 32))],
)
def test_counts_at_other_sizes(size, steps, counts):
    assert stage_plan(steps, size, size).counts == counts


@pytest.mark.parametrize(
    ("steps", "height", "width"), [(28, 512, 512), (4, 64, 64), (50, 1024, 768), (7, 320, 1280)]
)
def test_matches_the_real_scheduler_exactly(steps, height, width):
    plan = stage_plan(steps, height, width)
    scheduler = FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=list(plan.sigmas), mu=plan.mu)
    assert torch.equal(scheduler.sigmas[:-1], torch.tensor(plan.shifted_sigmas, dtype=torch.float32))
    assert len(plan.stages) == len(scheduler.timesteps) == steps


def test_matches_the_real_scheduler_exactly_over_many_steps_and_sizes():
    """The pure-Python σ (float32 rounding after every operation) against the scheduler's float32 tensors,
    and the unshifted schedule against numpy's linspace, value for value."""
    import numpy as np

    sizes = [(64, 64), (512, 512), (1024, 1024), (768, 1344), (320, 1280), (2048, 2048)]
    for steps in range(1, 61):
        assert list(stage_plan(steps, 512, 512).sigmas) == np.linspace(1.0, 1 / steps, steps).tolist()
        for height, width in sizes:
            plan = stage_plan(steps, height, width)
            scheduler = FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG)
            scheduler.set_timesteps(sigmas=list(plan.sigmas), mu=plan.mu)
            ours = torch.tensor(plan.shifted_sigmas, dtype=torch.float32)
            assert torch.equal(scheduler.sigmas[:-1], ours), (steps, height, width)
    config = {**DEFAULT_SCHEDULER_CONFIG, "time_shift_type": "linear"}
    plan = stage_plan(28, 1024, 1024, scheduler_config=config)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=list(plan.sigmas), mu=plan.mu)
    assert torch.equal(scheduler.sigmas[:-1], torch.tensor(plan.shifted_sigmas, dtype=torch.float32))


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_the_stage_plan_shift_is_time_shift_in_float32(shift_type):
    """The stage plan's pure-Python shift of one σ is `time_shift`: bit for bit on a float32 array (as the
    scheduler shifts its σ), and within a float32 ulp on the tensors training shifts (torch divides a number
    by a tensor through its reciprocal)."""
    import numpy as np

    config = {**DEFAULT_SCHEDULER_CONFIG, "time_shift_type": shift_type}
    sigmas = np.linspace(1.0, 0.001, 997).astype(np.float32)
    for tokens in (16, 256, 1024, 4096, 16384):
        mu = calculate_shift(tokens)
        ours = np.array([_shifted_sigma(float(s), mu, config) for s in sigmas], dtype=np.float32)
        assert np.array_equal(ours, time_shift(mu, sigmas, shift_type)), tokens
        on_tensors = time_shift(mu, torch.from_numpy(sigmas), shift_type)
        torch.testing.assert_close(on_tensors, torch.from_numpy(ours), rtol=0, atol=2**-24)


def test_an_unknown_shift_type_is_one_error_for_the_plan_and_training():
    with pytest.raises(ValueError, match="`time_shift_type` must be") as training:
        time_shift(0.5, torch.tensor([0.5]), "cosine")
    with pytest.raises(ValueError) as plan:
        stage_plan(4, 64, 64, scheduler_config={**DEFAULT_SCHEDULER_CONFIG, "time_shift_type": "cosine"})
    assert str(plan.value) == str(training.value)


def test_accepts_a_scheduler_config_and_static_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    plan = stage_plan(10, 512, 512, scheduler_config=scheduler.config)
    assert plan.mu is None
    scheduler.set_timesteps(sigmas=list(plan.sigmas))
    assert torch.equal(scheduler.sigmas[:-1], torch.tensor(plan.shifted_sigmas, dtype=torch.float32))


def test_sigmas_are_monotone_and_thresholds_follow_sigma():
    plan = stage_plan(28, 1024, 1024, (0.9, 0.5))
    assert list(plan.shifted_sigmas) == sorted(plan.shifted_sigmas, reverse=True)
    for sigma, stage in zip(plan.shifted_sigmas, plan.stages, strict=True):
        assert stage == (1 if sigma >= 0.9 else 2 if sigma >= 0.5 else 3)


def test_zero_thresholds_mean_mllm_only_throughout():
    assert stage_plan(28, 512, 512, (0.0, 0.0)).counts == (28, 0, 0)


def test_equal_thresholds_skip_stage_two():
    counts = stage_plan(28, 512, 512, (0.85, 0.85)).counts
    assert counts[1] == 0 and counts[0] + counts[2] == 28


def test_to_dict_is_json():
    plan = stage_plan(28, 512, 512)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["counts"] == [3, 4, 21]
    assert data["stage_thresholds"] == [0.95, 0.85]
    assert len(data["stages"]) == len(data["shifted_sigmas"]) == 28
    assert isinstance(plan, StagePlan)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"height": 500}, "height"),
        ({"width": -16}, "width"),
        ({"stage_thresholds": (0.5, 0.9)}, "stage_thresholds"),
        ({"stage_thresholds": (1.5, 0.9)}, "stage_thresholds"),
        ({"stage_thresholds": (0.9,)}, "stage_thresholds"),
        ({"scheduler_config": {"use_karras_sigmas": True}}, "scheduler_config"),
    ],
)
def test_invalid_arguments(kwargs, name):
    args = {"num_inference_steps": 28, "height": 512, "width": 512, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        stage_plan(**args)


def test_module_is_torch_and_numpy_free():
    # `validate` costs a plan (plan.estimate_cost reads the stage plan): numpy alone would add ~0.1 s to it.
    code = (
        "import sys, squeeze_cli.pipelines.stages; "
        "assert not {'torch', 'numpy'} & set(sys.modules), 'torch or numpy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
