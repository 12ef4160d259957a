"""The cost model: features, a non-negative relative-error fit, priors, online refits, history."""

import time

import numpy as np
import pytest

from models import ModelSpec, build_model
from tasks import calibration
from tasks.calibration import FUSED_EXTRAS, REPEATS, SHAPES, calibrate, prior_from
from tasks.cost_model import (
    CostModel,
    TaskWork,
    describe_task,
    fit_coefficients,
    load_history,
    macs_per_window,
    save_history,
)

SPEC = ModelSpec(hidden=8, layers=1, window=8, horizon=2, epochs_per_iteration=2, batch_size=16)


def work(networks, sample_work, steps, key=("mlp", "one_by_one", "cpu")):
    return TaskWork(*key, networks, sample_work, steps)


def test_features_follow_the_strategy_that_really_runs():
    rows = [10, 40, 100]
    alone = describe_task(rows, SPEC, "one_by_one", "cpu")
    fused = describe_task(rows, SPEC, "fused", "cuda:1")
    assert alone.steps == 2 * (1 + 3 + 7) and fused.steps == 2 * 7  # fused: the longest sets the steps
    assert alone.sample_work == fused.sample_work == 2 * 150 * macs_per_window(SPEC)
    assert fused.key == ("mlp", "fused", "cuda")
    lstm = SPEC.model_copy(update={"architecture": "lstm"})
    assert describe_task(rows, lstm, {"mlp": "fused", "lstm": "one_by_one"}, "cpu").strategy == "one_by_one"
    assert describe_task(rows, lstm, {"lstm": "fused"}, "cpu").strategy == "fused"
    assert macs_per_window(lstm) == pytest.approx(SPEC.window * sum(
        p.numel() for p in build_model(lstm).parameters()))  # every weight at every step
    transformer = SPEC.model_copy(update={"architecture": "transformer", "heads": 2})
    assert macs_per_window(transformer) > 2 * SPEC.window**2 * SPEC.hidden * SPEC.layers  # attention included


def test_fused_steps_use_the_group_width_the_workers_reported(monkeypatch):
    """The flow describes tasks with the width a worker reported, never by building the layer itself."""
    import tasks.cost_model

    lstm = SPEC.model_copy(update={"architecture": "lstm"})
    rows = [16 * b for b in (9, 8, 7, 6, 5, 4, 3, 2)]  # 9..2 batches of 16, longest first
    local = tasks.cost_model.fused_width("lstm", "cpu")
    monkeypatch.setattr(tasks.cost_model, "fused_width", lambda *a: pytest.fail("asked this process's width"))
    per_group = {2: 9 + 7 + 5 + 3, 4: 9 + 5, 8: 9, None: 9}  # each group's longest network sets its steps
    for width, steps in per_group.items():
        assert describe_task(rows, lstm, "fused", "cpu", {("lstm", "cpu"): width}).steps == 2 * steps
    monkeypatch.undo()
    assert describe_task(rows, lstm, "fused", "cpu", {("mlp", "cpu"): 2}).steps == 2 * per_group[local]


def test_fit_recovers_non_negative_coefficients_and_small_relative_errors():
    rng = np.random.default_rng(0)
    truth = np.array([0.05, 0.002, 3e-8, 0.0])  # no per-step cost: the fit must not make one up negative
    features = np.column_stack([np.ones(60), rng.integers(1, 64, 60), rng.uniform(1e5, 1e8, 60),
                                rng.integers(1, 500, 60)])  # fmt: skip
    seconds = features @ truth * rng.uniform(0.97, 1.03, 60)
    fitted = fit_coefficients(features, seconds)
    assert (fitted >= 0).all()
    errors = np.abs(features @ fitted - seconds) / seconds
    assert np.median(errors) < 0.03
    np.testing.assert_allclose(fitted[:3], truth[:3], rtol=0.15)


def test_prior_is_scaled_by_early_observations_then_refitted():
    prior = np.array([0.1, 0.0, 0.0, 0.01])
    model = CostModel({("mlp", "one_by_one", "cpu"): prior}, min_fit=4)
    w = work(1, 0.0, 100)
    assert model.predict(w) == pytest.approx(1.1)
    model.observe(w, 2.2)  # the machine is twice as slow as the prior thought
    assert model.predict(work(1, 0.0, 200)) == pytest.approx(2 * 2.1)
    for steps in (10, 50, 300, 1000):
        model.observe(work(1, 0.0, steps), 0.5 + 0.002 * steps)
    assert model.predict(work(1, 0.0, 600)) == pytest.approx(0.5 + 1.2, rel=0.05)
    with pytest.raises(KeyError):
        model.predict(work(1, 0.0, 1, key=("lstm", "one_by_one", "cpu")))


def test_history_round_trip_gives_the_next_run_a_prior(tmp_path):
    model = CostModel()
    for networks in (1, 2, 4, 8, 16, 32):
        model.observe(work(networks, networks * 1e6, networks * 10), 0.2 + 0.01 * networks)
    save_history(tmp_path, model)
    save_history(tmp_path, model)  # appended, not replaced
    history = load_history(tmp_path)
    assert len(history) == 12
    later = CostModel.from_history(history)
    assert later.knows(("mlp", "one_by_one", "cpu"))
    assert later.predict(work(10, 1e7, 100)) == pytest.approx(0.3, rel=0.05)


def test_calibration_times_real_tasks_and_yields_a_usable_prior():
    observations = calibrate(SPEC, "fused", "cpu", shortest=20, longest=400, budget_seconds=60.0)
    # Every shape but the warm-up, and (within the budget) the fused extras.
    assert len(observations) == len(SHAPES) - 1 + len(FUSED_EXTRAS)
    assert all(seconds > 0 for _, seconds in observations)
    assert {w.key for w, _ in observations} == {("mlp", "fused", "cpu")}
    assert max(w.networks for w, _ in observations) == 128  # one whole fused group of MLPs on a CPU
    model = CostModel(prior_from(observations))
    small, large = describe_task([20], SPEC, "fused", "cpu"), describe_task([400] * 64, SPEC, "fused", "cpu")
    assert 0 < model.predict(small) < model.predict(large)


def test_calibration_keeps_the_fastest_of_repeated_timings(monkeypatch):
    calls = []
    real = calibration.train_shard_iteration

    def slow_first_time(shard, ids, *args, **kwargs):
        repeat = int(ids[0].split("-")[2])
        calls.append((shard, repeat))
        if repeat == 0 and shard:
            time.sleep(0.3)  # the first timing of every shape is disturbed
        return real(shard, ids, *args, **kwargs)

    monkeypatch.setattr(calibration, "train_shard_iteration", slow_first_time)
    monkeypatch.setattr(calibration, "NOISY_SECONDS", 10.0)  # so the disturbed shapes count as noisy
    observations = calibrate(SPEC, "one_by_one", "cpu", shortest=20, longest=100, budget_seconds=60.0)
    assert len(observations) == len(SHAPES) - 1  # one by one: no whole fused groups
    assert all(seconds < 0.3 for _, seconds in observations)  # each shape's undisturbed repeat was kept
    assert sorted(set(calls)) == [(0, 0)] + [(s, r) for s in range(1, len(SHAPES)) for r in range(REPEATS)]


def test_calibration_adds_nothing_optional_once_its_budget_is_spent():
    observations = calibrate(SPEC, "fused", "cpu", shortest=20, longest=100, budget_seconds=0.0)
    assert len(observations) == len(SHAPES) - 1 and max(w.networks for w, _ in observations) == 16


