import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Where the tests do not run on a GPU, Triton's kernels (models/gpu_recurrent.py) run in its CPU
# interpreter, which must be chosen before Triton is first imported.
if os.environ.get("MANYNETS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from data.generate import generate_table  # noqa: E402
from models import ModelSpec  # noqa: E402


@pytest.fixture
def small_spec() -> ModelSpec:
    """A spec small enough that an iteration takes milliseconds."""
    return ModelSpec(hidden=8, layers=1, window=8, horizon=2, epochs_per_iteration=2, batch_size=16)


@pytest.fixture
def small_table() -> pd.DataFrame:
    """Six valid series of varied length."""
    return generate_table(6, min_length=60, max_length=300, seed=11)


def series_frame(series_id: str, values, start: str = "2026-01-01") -> pd.DataFrame:
    """A long-format frame for one series with daily timestamps."""
    values = list(values)
    return pd.DataFrame(
        {"series_id": series_id, "timestamp": pd.date_range(start, periods=len(values), freq="D"), "value": values}
    )


@pytest.fixture
def staged(tmp_path, small_spec):
    """An output dir with three staged series; returns (output_dir, series ids)."""
    from tasks.storage import stage_values

    rng = np.random.default_rng(0)
    ids = ["a", "b", "c"]
    for i, sid in enumerate(ids):
        t = np.arange(80 + 40 * i)
        stage_values(tmp_path, sid, (np.sin(t / 5) + 0.1 * rng.normal(size=t.size)).astype(np.float32))
    return str(tmp_path), ids


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def inprocess_cluster():
    """A Dask cluster whose worker is a thread of this process, so monkeypatched faults reach it."""
    import distributed

    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port, SQLite in a temp dir; yields its API URL."""
    from deployments.local import start_server, wait_healthy

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server = start_server(port, home, home / "server.log")
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, server)
        yield api_url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def served_deployment(prefect_server, tmp_path_factory):
    """`python -m deployments.serve` running against prefect_server; yields the deployment's id."""
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "deployments.serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    yield client.read_deployment_by_name("train-many/train-many").id
                    break
                except Exception:
                    assert time.monotonic() < deadline, "the deployment was not served in time"
                    time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=30)
