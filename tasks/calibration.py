"""Measure a cost-model prior by running a few tiny real tasks on synthetic series.

Used when no earlier run left a history: the same code path the run will use (staging, windows,
training, checkpoints) is timed on a handful of shard shapes, on the worker and device that will
train, so the prior reflects this machine rather than a guess.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from models import ModelSpec
from tasks.cost_model import TaskWork, describe_task, fit_coefficients
from tasks.storage import stage_values
from tasks.training import train_shard_iteration

# (networks, share of the way from the shortest to the longest training set); the first is a warm-up.
# The 16-network shape (a full fused group on CPU, tasks.fused.fused_width) shows how a fused
# task scales with its width, which the choice between strategies rests on.
SHAPES = ((1, 0.0), (1, 0.0), (1, 1.0), (4, 0.0), (4, 1.0), (2, 0.5), (16, 0.25))


def _length_for_rows(spec: ModelSpec, rows: int) -> int:
    """The shortest series length that yields `rows` training windows."""
    length = max(spec.min_length(), rows + spec.window + spec.horizon)
    while spec.train_windows(length) < rows:
        length += 1
    return length


def calibrate(
    spec: ModelSpec, strategy: str, device: str, shortest: int, longest: int, max_rows: int = 1024
) -> list[tuple[TaskWork, float]]:
    """Time tiny tasks of `spec` under `strategy` on `device`; return (work, seconds) observations.

    `shortest` and `longest` are the training-window counts of the run's networks; the calibration
    spans them, capped at `max_rows` windows and two epochs so it stays well under a few seconds.
    """
    spec = spec.model_copy(update={"epochs_per_iteration": min(spec.epochs_per_iteration, 2),
                                   "expanding_window": False})  # fmt: skip
    low, high = max(1, min(shortest, max_rows)), max(1, min(longest, max_rows))
    rng = np.random.default_rng(0)
    observations = []
    with tempfile.TemporaryDirectory(prefix="manynets-calibration-") as folder:
        for shape, (networks, share) in enumerate(SHAPES):
            rows = round(low + share * (high - low))
            length = _length_for_rows(spec, rows)
            ids = [f"calibration-{shape}-{k}" for k in range(networks)]
            for series_id in ids:
                stage_values(folder, series_id, rng.normal(size=length).astype(np.float32))
            started = time.perf_counter()
            result = train_shard_iteration(shape, ids, spec, 1, folder, device, strategy=strategy)
            seconds = time.perf_counter() - started
            if shape == 0 or any(n.status != "trained" for n in result.networks):
                continue  # the warm-up pays one-time costs; a failed shape measures nothing useful
            observations.append((describe_task([spec.train_windows(length)] * networks, spec, strategy, device),
                                 seconds))  # fmt: skip
    return observations


def prior_from(observations: list[tuple[TaskWork, float]]) -> dict[tuple[str, str, str], np.ndarray]:
    """Cost-model prior coefficients per key, fitted on calibration observations."""
    prior = {}
    for key in {work.key for work, _ in observations}:
        mine = [(w.vector(), s) for w, s in observations if w.key == key]
        prior[key] = fit_coefficients(np.array([v for v, _ in mine]), np.array([s for _, s in mine]))
    return prior
