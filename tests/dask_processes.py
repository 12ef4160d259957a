"""A real Dask cluster for chaos tests and benchmarks: scheduler and nanny-managed workers as processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed


class DaskProcesses:
    """`dask scheduler` and `n_workers` `dask worker` processes on loopback, stopped on exit.

    Each worker runs under a nanny, which restarts it when it is killed. `scheduler_env` adds
    environment variables to the scheduler only (e.g. DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES).
    """

    def __init__(self, folder: Path, n_workers: int = 2, scheduler_env: dict[str, str] | None = None):
        self.folder, self.n_workers, self.scheduler_env = Path(folder), n_workers, scheduler_env or {}
        self.processes: list[subprocess.Popen] = []
        self.client: distributed.Client | None = None
        self.address = ""

    def _start(self, args: list[str], log: str, env: dict[str, str]) -> None:
        dask = str(Path(sys.executable).with_name("dask"))
        with open(self.folder / log, "ab") as out:
            self.processes.append(subprocess.Popen([dask, *args], env=env, stdout=out, stderr=subprocess.STDOUT))

    def __enter__(self) -> DaskProcesses:
        self.folder.mkdir(parents=True, exist_ok=True)
        scheduler_file = self.folder / "scheduler.json"
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self._start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(scheduler_file)], "scheduler.log", {**env, **self.scheduler_env})  # fmt: skip
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if time.monotonic() > deadline or self.processes[0].poll() is not None:
                self.__exit__()
                raise RuntimeError(f"dask scheduler did not start; see {self.folder / 'scheduler.log'}")
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written before it is complete on some versions
        self.address = json.loads(scheduler_file.read_text())["address"]
        for i in range(self.n_workers):
            self._start(["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                         "--host", "127.0.0.1", "--name", f"worker-{i}"], f"worker-{i}.log", env)  # fmt: skip
        self.client = distributed.Client(self.address, timeout=60)
        self.client.wait_for_workers(self.n_workers, timeout=120)
        return self

    def kill_busy_worker(self, rng: random.Random | None = None) -> tuple[str, int] | None:
        """SIGKILL a worker that is running a task (its nanny restarts it); None if all are idle."""
        busy = [address for address, keys in self.client.processing().items() if keys]
        if not busy:
            return None
        address = (rng or random).choice(busy)
        pid = self.client.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)
        return address, pid

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
