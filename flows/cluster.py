"""Which Dask cluster runs the iteration tasks: a LocalCluster by default, or an existing scheduler."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import distributed
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from tasks.training import warm_up


class TorchWarmup(distributed.WorkerPlugin):
    """Warms PyTorch up on every worker as it joins, so no network pays for it."""

    name = "manynets-torch-warmup"

    def setup(self, worker: distributed.Worker) -> None:
        warm_up()


class ClusterUnreachable(ConnectionError):
    """The Dask scheduler named by cluster_address did not answer."""


def check_scheduler(address: str, timeout: float = 10.0) -> int:
    """Connect to the scheduler at `address` and return how many workers it has; raise if unreachable."""
    try:
        with distributed.Client(address, timeout=timeout) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterUnreachable(
            f"cannot reach a Dask scheduler at cluster_address={address!r} ({type(exc).__name__}: {exc}); "
            "start one (`dask scheduler` and `dask worker <address>`) or leave cluster_address unset "
            "to run on a local cluster"
        ) from exc


def local_worker_count(n_workers: int | None) -> int:
    """Workers for a LocalCluster: one per core unless told otherwise."""
    if n_workers is None:
        return max(1, os.cpu_count() or 1)
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be an integer >= 1 or None (one per core); got {n_workers!r}")
    return n_workers


def make_task_runner(cluster_address: str | None, n_workers: int | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner on the scheduler at `cluster_address`, or on a fresh LocalCluster.

    The LocalCluster has one single-threaded worker process per core: the networks are small, so
    parallelism comes from running many at once, not from threads inside one.
    """
    if cluster_address:
        return DaskTaskRunner(address=cluster_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": local_worker_count(n_workers),
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
        },
    )


@contextmanager
def workers_report_to_this_api() -> Iterator[None]:
    """Make Dask workers report to the Prefect API this flow reports to.

    Workers take their Prefect settings from the flow's settings context. In ephemeral mode (no
    PREFECT_API_URL) that context names no server, and every worker process would start a
    temporary server of its own on the same SQLite file; naming the flow's server avoids that.
    """
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    with temporary_settings({PREFECT_API_URL: api_url}):
        yield
