import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

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
