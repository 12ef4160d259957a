"""The train_many flow end to end, under prefect_test_harness, on a real LocalCluster."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect.artifacts import Artifact

from flows.train import train_many
from tasks.storage import checkpoint_iterations, network_dir
from tests.conftest import series_frame

MODEL = {"hidden": 8, "layers": 1, "window": 8, "horizon": 2, "epochs_per_iteration": 2, "batch_size": 32}


pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def dirty_table(small_table):
    """Six valid series, one whose id tries to escape the output dir, and three invalid ones."""
    bad = [
        series_frame("../escape", np.sin(np.arange(120) / 4)),
        series_frame("flat", [3.0] * 100),
        series_frame("short", np.arange(10.0)),
        series_frame("holes", [1.0, np.nan] + list(np.arange(98.0))),
    ]
    return pd.concat([small_table.astype({"series_id": str}), *bad], ignore_index=True)


def test_one_task_per_network_trains_every_valid_series_and_reports_the_rest(tmp_path, dirty_table):
    out = tmp_path / "run"
    results = train_many(dirty_table, model=MODEL, iterations=2, shard_size=1, output_dir=str(out), n_workers=2)

    rows = results.set_index("series_id")
    valid = [f"s{i}" for i in range(6)] + ["../escape"]
    assert list(results["series_id"]) == valid + ["flat", "short", "holes"]
    assert (rows.loc[valid, "status"] == "trained").all()
    assert (rows.loc[valid, "iterations_done"] == 2).all()
    assert rows.loc[valid, "val_loss"].notna().all() and (rows.loc[valid, "seconds"] > 0).all()
    assert rows.loc["flat", "reason"] == "constant series"
    assert "too short" in rows.loc["short", "reason"] and "NaN" in rows.loc["holes", "reason"]
    assert (rows.loc[["flat", "short", "holes"], "status"] == "invalid").all()
    assert sorted(rows.loc[valid, "position"]) == list(range(7))
    for series_id in valid:
        assert checkpoint_iterations(network_dir(out, series_id)) == [1, 2]
    escaped = rows.loc["../escape", "checkpoint"]
    assert Path(escaped).resolve().is_relative_to((out / "networks").resolve())
    assert not (tmp_path / "escape").exists()

    on_disk = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(on_disk, results, check_dtype=False)
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert len(tasks) == 14 and set(tasks["iteration"]) == {1, 2} and tasks["networks"].eq(1).all()
    # Iteration 2 of a network never starts before its iteration 1 finished.
    for shard_id, chain in tasks.groupby("shard_id"):
        first, second = chain.sort_values("iteration").itertuples()
        assert second.started >= first.finished

    artifact = Artifact.get("train-many-results")
    table = json.loads(artifact.data)
    assert len(table) == 10 and {row["status"] for row in table} == {"trained", "invalid"}


def test_shards_of_several_networks_train_and_a_rerun_redoes_nothing(tmp_path, small_table):
    out = str(tmp_path / "run")
    first = train_many(small_table, model=MODEL, iterations=1, shard_size=4, output_dir=out, n_workers=2)
    assert (first["status"] == "trained").all()
    assert sorted(first["shard_id"].unique()) == [0, 1]
    again = train_many(small_table, model=MODEL, iterations=1, shard_size=4, output_dir=out, n_workers=1)
    tasks = pd.read_parquet(f"{out}/tasks.parquet")
    assert tasks["trained"].sum() == 0 and tasks["skipped"].sum() == 6
    assert (again["seconds"] == 0).all()
    np.testing.assert_array_equal(again["val_loss"], first["val_loss"])
    # The DataFrame parameter is recorded by its shape, not encoded cell by cell.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["train-many-run"])))
    runs = [r for r in runs if r.parameters["output_dir"] == out]  # other tests' runs share the name
    assert len(runs) == 2 and all(r.parameters["data"] == f"<DataFrame: {len(small_table)} rows, columns "
                                  "series_id, timestamp, value>" for r in runs)  # fmt: skip
    assert runs[0].parameters["iterations"] == 1 and runs[0].parameters["model"]["hidden"] == 8


def test_more_iterations_later_continue_from_the_checkpoints(tmp_path, small_table):
    out = str(tmp_path / "run")
    train_many(small_table, model=MODEL, iterations=1, shard_size=3, output_dir=out, n_workers=1)
    results = train_many(small_table, model=MODEL, iterations=2, shard_size=3, output_dir=out, n_workers=1)
    tasks = pd.read_parquet(f"{out}/tasks.parquet")
    assert (results["iterations_done"] == 2).all()
    assert tasks.loc[tasks["iteration"] == 1, "trained"].sum() == 0
    assert tasks.loc[tasks["iteration"] == 2, "trained"].sum() == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shard_size": 0}, "shard_size must be .auto. .planned from the cost model. or an integer >= 1"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"model": {"architecture": "resnet"}}, "architecture"),
        ({"device": "tpu"}, "device must be"),
        ({"strategy": "vmap"}, "strategy"),
        ({"data": "missing.parquet"}, "does not exist"),
        ({"data": pd.DataFrame({"id": ["a"], "value": [1.0]})}, "lacks column"),
        ({"cluster_address": "tcp://127.0.0.1:9"}, "cannot reach a Dask scheduler"),
    ],
)
def test_bad_input_fails_at_once_naming_it_and_trains_nothing(tmp_path, small_table, kwargs, message):
    out = tmp_path / "run"
    kwargs = {"data": small_table, "model": MODEL, "output_dir": str(out), **kwargs}
    with pytest.raises(Exception, match=message):
        train_many(**kwargs)
    assert not (out / "networks").exists()


def test_the_fused_strategy_gives_the_same_networks_as_one_by_one(tmp_path, small_table):
    common = {"model": MODEL, "iterations": 2, "shard_size": 3, "n_workers": 2}
    fused = train_many(small_table, output_dir=str(tmp_path / "fused"), strategy="fused", **common)
    alone = train_many(small_table, output_dir=str(tmp_path / "alone"), strategy="one_by_one", **common)
    assert (fused["status"] == "trained").all() and (fused["iterations_done"] == 2).all()
    np.testing.assert_allclose(fused["val_loss"], alone["val_loss"], rtol=2e-4, atol=2e-5)


def test_networks_that_stop_early_leave_their_chains_and_are_reported_stopped(tmp_path, small_table):
    # A min_delta no loss can beat: the first epoch sets the best, the next two do not improve on it, so
    # every network stops after 3 of its 4 epochs, in iteration 1 of 3.
    model = {**MODEL, "epochs_per_iteration": 4, "early_stopping_patience": 2, "early_stopping_min_delta": 1e9}
    out = tmp_path / "run"
    results = train_many(small_table, model=model, iterations=3, shard_size=3, output_dir=str(out), n_workers=2,
                         strategy="fused", progress_bar=False)  # fmt: skip
    assert (results["status"] == "stopped").all() and (results["iterations_done"] == 1).all()
    assert results["reason"].str.contains("stopped early after 3 epochs").all()
    assert results["val_loss"].notna().all()
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert set(tasks["iteration"]) == {1}, "a stopped network's later iterations must not be scheduled"
