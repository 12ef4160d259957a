"""The cost model and its priorities inside train_many, on a real LocalCluster of worker processes."""

import json

import numpy as np
import pandas as pd
import pytest

from flows.train import train_many
from models import ModelSpec
from tasks.fused import fused_width
from tasks.storage import checkpoint_path, load_checkpoint, network_dir
from tests.conftest import series_frame

MODEL = {"hidden": 8, "layers": 1, "window": 8, "horizon": 2, "epochs_per_iteration": 2, "batch_size": 16,
         "expanding_window": True, "expanding_start": 0.4}  # fmt: skip

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def mixed_table():
    """Twelve series of 60 to 900 points; every third one asks for an LSTM in the architecture column."""
    rng = np.random.default_rng(5)
    frames = []
    for i, length in enumerate(np.geomspace(60, 900, 12).astype(int)):
        frame = series_frame(f"s{i}", np.sin(np.arange(length) / (3 + i)) + 0.1 * rng.normal(size=length))
        frame["architecture"] = "lstm" if i % 3 == 0 else None
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_planned_shards_and_priorities_reach_dask_and_are_reported(tmp_path, mixed_table):
    out = tmp_path / "run"
    results = train_many(mixed_table, model=MODEL, iterations=3, output_dir=str(out), n_workers=2,
                         strategy="fused", progress_bar=False)  # fmt: skip

    assert (results["status"] == "trained").all() and (results["iterations_done"] == 3).all()
    tasks = pd.read_parquet(out / "tasks.parquet")
    # Every task was predicted before it ran, and given a priority that the worker really held it under.
    assert tasks["predicted_seconds"].notna().all() and (tasks["predicted_seconds"] > 0).all()
    assert tasks["priority"].notna().all()
    assert (tasks["priority"] == tasks["dask_priority"]).all()
    # A priority is the shard's predicted remaining chain in ms: this task (plus the measured overhead)
    # on the last iteration, and more than that before it. (It may grow along a chain: the model is
    # refitted between submissions.)
    overhead = json.loads((out / "schedule.json").read_text())["probe_overhead_seconds"]
    own = (1000 * (tasks["predicted_seconds"] + overhead)).round()
    last = tasks["iteration"] == 3
    assert ((tasks.loc[last, "priority"] - own[last]).abs() <= 1).all()
    assert (tasks.loc[~last, "priority"] > own[~last] + 1).all()
    # Shards hold one architecture each; LSTM series were trained as LSTMs, the rest as MLPs.
    mlp, lstm = ModelSpec(**MODEL), ModelSpec(**{**MODEL, "architecture": "lstm"})
    for i in range(12):
        state = load_checkpoint(checkpoint_path(network_dir(out, f"s{i}"), 3))
        assert state["spec"] == (lstm if i % 3 == 0 else mlp).fingerprint()
    # The expanding window: each iteration trained on more windows than the last.
    first = load_checkpoint(checkpoint_path(network_dir(out, "s11"), 2))["metrics"]["train_windows"]
    assert first < results.set_index("series_id").loc["s11", "train_windows"]

    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["planned"] and schedule["priorities"] and schedule["workers"] == 2
    assert schedule["tasks"] == len(tasks) and schedule["priorities_seen_by_dask"] == len(tasks)
    assert 0 < schedule["lower_bound_seconds"] <= schedule["makespan_seconds"]
    assert schedule["mape_percent"] is not None and schedule["mape_after_first_iteration_percent"] is not None
    assert (out / "plots" / "predicted_vs_actual.png").stat().st_size > 0
    assert len(pd.read_parquet(out / "cost_history.parquet")) == len(tasks)

    # A second run in the same folder starts from that history (no calibration) and redoes nothing.
    again = train_many(mixed_table, model=MODEL, iterations=3, output_dir=str(out), n_workers=2,
                       strategy="fused", progress_bar=False)  # fmt: skip
    assert (again["status"] == "trained").all()
    assert pd.read_parquet(out / "tasks.parquet")["trained"].sum() == 0


def test_without_priorities_tasks_run_at_dask_default_priority(tmp_path, mixed_table):
    out = tmp_path / "fifo"
    train_many(mixed_table, model=MODEL, iterations=2, shard_size=3, output_dir=str(out), n_workers=2,
               priorities=False, progress_bar=False)  # fmt: skip
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert tasks["priority"].isna().all() and (tasks["dask_priority"] == 0).all()
    assert len(tasks) == 2 * 5  # 8 MLP series in shards of 3 (3+3+2), 4 LSTM series (3+1)
    schedule = json.loads((out / "schedule.json").read_text())
    assert not schedule["planned"] and schedule["priorities_asked"] == 0


def test_auto_strategy_is_chosen_per_architecture_from_calibrated_timings(tmp_path, mixed_table, monkeypatch):
    out = tmp_path / "run"
    # The flow's process plans with the widths a worker reports; computing its own could build the compiled
    # layer on a machine that trains nothing (the workers are other processes: this does not reach them).
    monkeypatch.setattr("tasks.cost_model.fused_width", lambda *a: pytest.fail("the flow computed a fused width"))
    results = train_many(mixed_table, model=MODEL, iterations=1, output_dir=str(out), n_workers=2,
                         progress_bar=False)  # strategy="auto" is the default  # fmt: skip
    assert (results["status"] == "trained").all()
    schedule = json.loads((out / "schedule.json").read_text())
    assert set(schedule["strategies"]) == {"mlp", "lstm"}
    for architecture, chosen in schedule["strategies"].items():
        # Both strategies were calibrated on a worker and the faster predicted plan won.
        predicted = schedule["strategy_predictions"][architecture]
        assert set(predicted) == {"one_by_one", "fused"} and all(v > 0 for v in predicted.values())
        assert chosen == min(predicted, key=predicted.get)
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert set(tasks["strategy"]) <= set(schedule["strategies"].values())
    # The plan's fused group widths are what a worker reported (the same machine here, so the same answer).
    assert schedule["fused_group_widths"] == {a: fused_width(a, "cpu") for a in ("mlp", "lstm")}
    history = pd.read_parquet(out / "cost_history.parquet")
    assert set(zip(history["architecture"], history["strategy"])) == set(schedule["strategies"].items())


def test_a_worker_that_cannot_report_its_group_widths_does_not_stop_the_run(tmp_path, mixed_table, monkeypatch):
    from prefect import task

    import flows.shard_chains

    @task(name="fused-group-widths", retries=0)
    def broken(architectures, device):
        raise RuntimeError("worker gone")

    monkeypatch.setattr(flows.shard_chains, "group_widths_task", broken)
    out = tmp_path / "run"
    results = train_many(mixed_table, model=MODEL, iterations=1, shard_size=4, output_dir=str(out), n_workers=2,
                         strategy="fused", priorities=False, progress_bar=False)  # fmt: skip
    assert (results["status"] == "trained").all()
    assert json.loads((out / "schedule.json").read_text())["fused_group_widths"] == {}
