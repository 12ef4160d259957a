"""Faults inside tasks, under the real flow: retries, failed shards, out of memory."""

import pandas as pd
import pytest
import torch

import flows.shard_chains as shard_chains
import tasks.prefect_tasks as prefect_tasks
import tasks.training as training
from flows.train import train_many

pytestmark = pytest.mark.usefixtures("prefect_api")

def call_log(path):
    """Record and count calls in a file: the task may run on a deserialised copy of a test's closure."""

    def record(key) -> int:
        with open(path, "a") as handle:
            handle.write(f"{key}\n")
        return path.read_text().split().count(str(key))

    return record


MODEL = {"hidden": 8, "layers": 1, "window": 8, "horizon": 2, "epochs_per_iteration": 2, "batch_size": 32}


def test_a_whole_task_failure_is_retried_by_prefect(tmp_path, small_table, inprocess_cluster, monkeypatch):
    real, record = prefect_tasks.train_shard_iteration, call_log(tmp_path / "calls.txt")

    def fails_first_time(shard_id, *args, **kwargs):
        if record(shard_id) == 1 and shard_id == 1:
            raise ConnectionError("shared disk went away")
        return real(shard_id, *args, **kwargs)

    monkeypatch.setattr(prefect_tasks, "train_shard_iteration", fails_first_time)
    results = train_many(small_table, model=MODEL, iterations=1, shard_size=3, output_dir=str(tmp_path / "run"),
                         cluster_address=inprocess_cluster)  # fmt: skip
    assert (results["status"] == "trained").all()
    assert sorted((tmp_path / "calls.txt").read_text().split()) == ["0", "1", "1"]


def test_a_task_that_fails_after_its_retries_fails_only_its_own_networks(
    tmp_path, small_table, inprocess_cluster, monkeypatch
):
    def broken_for_shard_0(shard_id, *args, **kwargs):
        if shard_id == 0:
            raise ConnectionError("shared disk went away")
        return training.train_shard_iteration(shard_id, *args, **kwargs)

    monkeypatch.setattr(prefect_tasks, "train_shard_iteration", broken_for_shard_0)
    quick = prefect_tasks.train_shard_iteration_task.with_options(retries=1, retry_delay_seconds=0)
    monkeypatch.setattr(shard_chains, "train_shard_iteration_task", quick)
    results = train_many(small_table, model=MODEL, iterations=2, shard_size=3, output_dir=str(tmp_path),
                         cluster_address=inprocess_cluster).set_index("series_id")  # fmt: skip
    failed = results.loc[["s0", "s1", "s2"]]
    assert (failed["status"] == "failed").all()
    assert failed["reason"].str.contains("shard-0-iter-1 failed after retries.*shared disk went away").all()
    assert (results.loc[["s3", "s4", "s5"], "status"] == "trained").all()
    assert (results.loc[["s3", "s4", "s5"], "iterations_done"] == 2).all()


def test_a_shard_that_runs_out_of_memory_is_halved_and_every_network_trains(
    tmp_path, small_table, inprocess_cluster, monkeypatch
):
    real, record = training.train_network_iteration, call_log(tmp_path / "calls.txt")

    def out_of_memory_once(series_id, *args, **kwargs):
        if series_id == "s1" and record(series_id) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(series_id, *args, **kwargs)

    monkeypatch.setattr(training, "train_network_iteration", out_of_memory_once)
    out = tmp_path / "run"
    # one_by_one: the fault is injected per network, which the fused path does not call.
    results = train_many(small_table, model=MODEL, iterations=2, shard_size=6, output_dir=str(out),
                         cluster_address=inprocess_cluster, strategy="one_by_one")  # fmt: skip
    assert (results["status"] == "trained").all() and (results["iterations_done"] == 2).all()
    tasks = pd.read_parquet(out / "tasks.parquet")
    first = tasks[tasks["iteration"] == 1].sort_values("shard_id")
    # shard 0 trained s0 then hit the OOM; s1..s5 were retried as two new shards of 3 and 2.
    assert list(first["shard_id"]) == [0, 1, 2] and list(first["networks"]) == [1, 3, 2]
    assert set(tasks.loc[tasks["iteration"] == 2, "shard_id"]) == {0, 1, 2}
