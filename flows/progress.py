"""A run's progress where users look: a Prefect progress artifact and a terminal bar."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunProgress:
    """Counts network-iterations finished out of networks x iterations, with an ETA.

    A network that fails or is given up on counts its remaining iterations as finished: nothing
    more will be done for it. The ETA extrapolates the throughput observed so far.
    """

    UPDATE_EVERY_S = 1.0  # at most one API call a second, however fast tasks finish

    def __init__(self, networks: int, iterations: int, show_bar: bool = True):
        self.total, self.iterations, self.done, self.networks_finished = networks * iterations, iterations, 0, 0
        self.networks = networks
        self.started = self.last_update = time.monotonic()
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="train-many-progress", description=self._description()
        )
        self.bar = None
        if show_bar:
            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("network-iterations"), TimeRemainingColumn())  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total)

    def _description(self) -> str:
        eta = ""
        if 0 < self.done < self.total:
            remaining = (time.monotonic() - self.started) / self.done * (self.total - self.done)
            eta = f", ETA {int(remaining // 60)}m{int(remaining % 60):02d}s"
        return (f"{self.networks_finished}/{self.networks} networks finished, "
                f"{self.done}/{self.total} network-iterations{eta}")  # fmt: skip

    def advance(self, iteration: int, trained: int, given_up: int) -> None:
        """Record a task's outcome at `iteration`: networks trained, and networks that stop here."""
        self.done += trained + given_up * (self.iterations - iteration + 1)
        self.networks_finished += given_up + (trained if iteration == self.iterations else 0)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        now = time.monotonic()
        if now - self.last_update >= self.UPDATE_EVERY_S or self.done >= self.total:
            self.last_update = now
            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / max(1, self.total),
                                     description=self._description())  # fmt: skip

    def close(self) -> None:
        update_progress_artifact(self.artifact_id, progress=100.0 * self.done / max(1, self.total),
                                 description=self._description())  # fmt: skip
        if self.bar is not None:
            self.bar.stop()
