"""Chaos: workers and the flow process are killed for real, and nothing trained is lost.

A real scheduler and nanny-managed workers run as separate processes on loopback. Every run is
compared with an undisturbed run of the same data and seeds: the deterministic CPU path must give
the same losses, and the journals must show no iteration checkpointed twice.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from data.generate import generate_table, write_table
from flows.train import train_many
from tasks.storage import network_dir, read_journal
from tests.dask_processes import DaskProcesses

pytestmark = pytest.mark.usefixtures("prefect_api")

MODEL = {"epochs_per_iteration": 10}
RUN = {"model": MODEL, "iterations": 2, "shard_size": 3}


@pytest.fixture(scope="module")
def chaos_table():
    return generate_table(12, min_length=1500, max_length=3000, seed=21)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, chaos_table, prefect_api):
    out = tmp_path_factory.mktemp("undisturbed")
    return train_many(chaos_table, output_dir=str(out), n_workers=2, **RUN).set_index("series_id")


def done_counts(output_dir, series_ids) -> Counter:
    """How many times each (network, iteration) was checkpointed, from the journals."""
    return Counter(
        (series_id, event["iteration"])
        for series_id in series_ids
        for event in read_journal(network_dir(output_dir, series_id))
        if event["event"] == "done"
    )


def assert_complete_and_equal(results, undisturbed, output_dir):
    results = results.set_index("series_id")
    assert (results["status"] == "trained").all(), results[["status", "reason"]]
    assert (results["iterations_done"] == 2).all()
    np.testing.assert_allclose(results["val_loss"], undisturbed.loc[results.index, "val_loss"], rtol=1e-5)
    np.testing.assert_allclose(results["train_loss"], undisturbed.loc[results.index, "train_loss"], rtol=1e-5)
    counts = done_counts(output_dir, results.index)
    assert set(counts) == {(s, i) for s in results.index for i in (1, 2)}
    assert max(counts.values()) == 1, "an iteration was checkpointed twice"


def kill_when_training(cluster: DaskProcesses, output_dir, killed: list) -> None:
    """Once the first checkpoint exists, kill a worker that is running a task."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not killed:
        if any(output_dir.glob("networks/*/iter-00001.ckpt")):
            victim = cluster.kill_busy_worker()
            if victim:
                killed.append(victim)
                return
        time.sleep(0.05)


def test_worker_killed_mid_iteration_loses_nothing(tmp_path, chaos_table, undisturbed):
    out = tmp_path / "run"
    killed: list = []
    with DaskProcesses(tmp_path / "dask") as cluster:
        threading.Thread(target=kill_when_training, args=(cluster, out, killed), daemon=True).start()
        results = train_many(chaos_table, output_dir=str(out), cluster_address=cluster.address, **RUN)
    assert killed, "no worker was killed: the run ended first"
    assert_complete_and_equal(results, undisturbed, out)
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert sorted(zip(tasks["shard_id"], tasks["iteration"])) == [(s, i) for s in range(4) for i in (1, 2)]


def test_a_task_dask_gives_up_on_is_halved_and_retried(tmp_path, chaos_table, undisturbed):
    out = tmp_path / "run"
    killed: list = []
    # allowed-failures=0: the first worker death under a task makes Dask give up on it (KilledWorker).
    scheduler_env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    with DaskProcesses(tmp_path / "dask", scheduler_env=scheduler_env) as cluster:
        threading.Thread(target=kill_when_training, args=(cluster, out, killed), daemon=True).start()
        results = train_many(chaos_table, output_dir=str(out), cluster_address=cluster.address, **RUN)
    assert killed
    assert_complete_and_equal(results, undisturbed, out)
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert tasks["shard_id"].max() >= 4, "no shard was halved"


def test_flow_killed_mid_run_resumes_where_it_stopped(tmp_path, chaos_table, undisturbed):
    data, out = tmp_path / "series.parquet", tmp_path / "run"
    write_table(chaos_table, data)
    command = [sys.executable, "-m", "flows.cli", "--data", str(data), "--output-dir", str(out),
               "--iterations", "2", "--shard-size", "3", "--epochs-per-iteration", "10", "--n-workers", "2"]  # fmt: skip
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    # Its own session, so killing the group takes its LocalCluster and Prefect server down with it.
    with open(tmp_path / "flow.log", "wb") as log:
        flow = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("networks/*/iter-00001.ckpt"))) < 4:
            assert flow.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the flow trained nothing in time"
            time.sleep(0.05)
    finally:
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
    assert not (out / "results.parquet").exists(), "the flow finished before it was killed"
    before = done_counts(out, chaos_table["series_id"].unique())

    results = train_many(chaos_table, output_dir=str(out), n_workers=2, **RUN)
    assert_complete_and_equal(results, undisturbed, out)
    tasks = pd.read_parquet(out / "tasks.parquet")
    assert tasks["skipped"].sum() >= len(before) > 0  # what was checkpointed before the kill was not redone
