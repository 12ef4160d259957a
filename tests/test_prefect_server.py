"""train_many served to a real Prefect server and started as the UI's Run button does."""

import json
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from data.generate import generate_table, write_table

MODEL = {"hidden": 8, "layers": 1, "window": 8, "horizon": 2, "epochs_per_iteration": 2, "batch_size": 32}


def run_and_wait(client, deployment_id, parameters, timeout=300):
    """Create a flow run from the deployment (what Run does) and wait for a final state."""
    flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    deadline = time.monotonic() + timeout
    while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {flow_run.state.name} after {timeout} s"
        time.sleep(1)
    return flow_run


def test_a_run_started_from_the_deployment_completes_with_its_artifacts(
    prefect_server, served_deployment, tmp_path
):
    data = tmp_path / "series.parquet"
    write_table(generate_table(5, min_length=60, max_length=200, seed=4), data)
    parameters = {"data": str(data), "model": MODEL, "iterations": 2, "shard_size": 2,
                  "output_dir": str(tmp_path / "run"), "n_workers": 1}  # fmt: skip
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        deployment = client.read_deployment(served_deployment)
        assert [s.active for s in deployment.schedules] == [False]  # nightly schedule, off by default
        assert deployment.parameter_openapi_schema["properties"]["iterations"]["description"]

        flow_run = run_and_wait(client, served_deployment, parameters)
        assert flow_run.state.is_completed(), flow_run.state.message
        assert flow_run.name == "train-many-run"

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        by_key = {a.key: a for a in artifacts}
        table = json.loads(by_key["train-many-results"].data)
        assert len(table) == 5 and {row["status"] for row in table} == {"trained"}
        assert {row["iterations_done"] for row in table} == {2}
        summary = by_key["train-many-summary"].data
        assert "# train_many: 5 networks" in summary and "| trained | 5 |" in summary
        assert "tasks_gantt.png" in summary

        progress = client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": ["train-many-progress"]}))
        assert progress and float(progress[-1].data) == pytest.approx(100.0)
        assert "5/5 networks finished" in progress[-1].description
    for plot in ("loss_distribution.png", "time_by_position.png", "tasks_gantt.png"):
        assert (tmp_path / "run" / "plots" / plot).stat().st_size > 1000


def test_prefect_yaml_deploys_train_many_to_a_process_work_pool(tmp_path):
    """`prefect deploy --all` with the repo's prefect.yaml, against a server of its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from deployments.local import start_server, wait_healthy
    from tests.conftest import free_port

    port = free_port()
    server = start_server(port, tmp_path / "home", tmp_path / "server.log")
    api_url = f"http://127.0.0.1:{port}/api"
    repo = Path(__file__).resolve().parents[1]
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "home"), "MANYNETS_HOME": str(repo)}
    try:
        wait_healthy(api_url, server)
        for command in (["work-pool", "create", "manynets", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            done = subprocess.run([prefect, *command], cwd=repo, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("train-many/train-many")
        assert deployment.entrypoint == "flows/train.py:train_many"
        assert deployment.work_pool_name == "manynets"
        assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [("0 2 * * *", False)]
    finally:
        server.terminate()
        server.wait(timeout=30)
