"""Which Dask cluster runs the iteration tasks: a LocalCluster by default, or an existing scheduler."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import distributed
import torch
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from models.spec import ARCHITECTURES
from tasks.allocator import keep_freed_memory
from tasks.training import warm_up


# (device, architecture) pairs already warmed up in this worker process: the local cluster registers the
# plugin when it starts and train_shards registers it again (it must, for an existing cluster), which
# re-runs setup.
_WARMED: set[tuple[str, str]] = set()


class TorchWarmup(distributed.WorkerPlugin):
    """Readies every worker as it joins: malloc thresholds for training (tasks.allocator), and PyTorch
    warmed up for `architectures` on the run's device, so no network pays for it. A process warms each
    architecture once per device. A worker without a GPU in a CUDA run (it gets no CUDA tasks) warms its CPU."""

    name = "manynets-torch-warmup"

    def __init__(self, architectures: tuple[str, ...] = ARCHITECTURES, device: str = "cpu"):
        self.architectures = tuple(architectures)
        self.device = device

    @classmethod
    def for_run(cls, spec_architecture: str, architectures: dict[str, str], device: str = "cpu") -> "TorchWarmup":
        """The plugin for a run of `spec_architecture` whose series may name others (series id -> architecture)."""
        return cls(tuple(sorted({spec_architecture, *architectures.values()})), device)

    def setup(self, worker: distributed.Worker) -> None:
        keep_freed_memory()
        device = self.device if self.device == "cpu" or torch.cuda.is_available() else "cpu"
        cold = tuple(a for a in self.architectures if (device, a) not in _WARMED)
        if cold:
            warm_up(device, cold)
            _WARMED.update((device, a) for a in cold)


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


def gpu_worker_count(address: str, timeout: float = 10.0) -> int:
    """How many workers of the scheduler at `address` declare a `GPU` resource."""
    with distributed.Client(address, timeout=timeout) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) > 0)


def resolve_device(device: str, cluster_address: str | None) -> str:
    """The device `device` means: 'auto' is 'cuda' where the cluster can run CUDA work, else 'cpu'.

    A local cluster can when this machine has CUDA; an existing one when a worker declares a
    `GPU` resource (`dask worker ... --resources GPU=1`, or dask-cuda's workers given one). An
    explicit 'cuda' on an existing cluster without such a worker is refused: its tasks, which
    ask for that resource, would wait forever.
    """
    if device == "auto":
        if cluster_address:
            return "cuda" if gpu_worker_count(cluster_address) else "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and cluster_address and not gpu_worker_count(cluster_address):
        raise ValueError(
            f"device={device!r} but no worker of the Dask cluster at {cluster_address!r} declares a GPU "
            "resource; start GPU workers with `--resources GPU=1` (one per GPU), or use device='auto' or 'cpu'"
        )
    if device.startswith("cuda") and not cluster_address and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this machine has no CUDA device; use device='auto' or 'cpu'")
    return device


def local_worker_count(n_workers: int | None, device: str = "cpu") -> int:
    """Workers for a LocalCluster: one per core, or one per GPU for CUDA work, unless told otherwise."""
    if n_workers is None:
        if device.startswith("cuda"):
            return max(1, torch.cuda.device_count())
        return max(1, os.cpu_count() or 1)
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be an integer >= 1 or None (one per core); got {n_workers!r}")
    return n_workers


def local_cluster_kwargs(n_workers: int | None, device: str) -> dict:
    """LocalCluster arguments: one single-threaded worker process per core (or per GPU for CUDA work).

    The networks are small, so parallelism comes from running many at once, not from threads
    inside one. For CUDA work each worker declares the `GPU` resource the tasks ask for.
    """
    kwargs = {
        "n_workers": local_worker_count(n_workers, device),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
    }
    if device.startswith("cuda"):
        kwargs["resources"] = {"GPU": 1}
    return kwargs


class LocalClusterInBackground:
    """A LocalCluster started from a thread, so that its workers spawn, import PyTorch and warm up
    while the flow validates and stages the data (about 3 s of a run's fixed cost here).

    `address()` waits for it; `close()` shuts it down (`wait=False` starts that and returns, so the
    report is written meanwhile; a later `close()` waits). Arguments are checked at once.
    """

    def __init__(self, n_workers: int | None, device: str, warmup: TorchWarmup):
        kwargs = local_cluster_kwargs(n_workers, device)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manynets-local-cluster")
        self._cluster = self._thread.submit(self._start, kwargs, warmup)
        self._closing = None

    @staticmethod
    def _start(kwargs: dict, warmup: TorchWarmup) -> distributed.LocalCluster:
        cluster = distributed.LocalCluster(**kwargs)
        try:
            with distributed.Client(cluster) as client:
                client.register_plugin(warmup)
        except BaseException:
            cluster.close()
            raise
        return cluster

    def address(self) -> str:
        """The scheduler's address, once the cluster is up (re-raises if it could not start)."""
        return self._cluster.result().scheduler_address

    def _close(self) -> None:
        try:
            cluster = self._cluster.result()
        except Exception:
            return  # it never started; address() has reported why
        cluster.close()

    def close(self, wait: bool = True) -> None:
        if self._closing is None:
            self._closing = self._thread.submit(self._close)
        if wait:
            self._closing.result()
            self._thread.shutdown()


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
