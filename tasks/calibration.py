"""Measure a cost-model prior by running a few tiny real tasks on synthetic series.

Used when no earlier run left a history: the same code path the run will use (staging, windows,
training, checkpoints) is timed on a handful of shard shapes, on the worker and device that will
train, so the prior reflects this machine rather than a guess. Measured by
`python -m benchmarks.calibration_stability`.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from models import ModelSpec
from tasks.cost_model import TaskWork, describe_task, effective_strategy, fit_coefficients
from tasks.fused import fused_width
from tasks.storage import stage_values
from tasks.training import train_shard_iteration

# (networks, share of the way from the shortest to the longest training set); the first is a warm-up.
# The 16-network shape shows how a fused task scales with its width, which the choice between
# strategies rests on.
SHAPES = ((1, 0.0), (1, 0.0), (1, 1.0), (4, 0.0), (4, 1.0), (2, 0.5), (16, 0.25))
# Fused only, after SHAPES while the budget lasts: one whole fused group (tasks.fused.fused_width;
# None) at the longest and at the shortest length, and 16 networks at the longest. The shapes above
# take 6-30 ms each for MLPs, mostly per-network and per-step costs, so they left the cost per
# multiply-add to noise: five calibrations with SHAPES alone predicted 1.21-6.60 s for a first task
# of `make run` that took 3.2-3.9 s, five with these extras and repeats 2.82-3.31 s
# (`python -m benchmarks.calibration_stability`).
FUSED_EXTRAS = ((None, 1.0), (None, 0.0), (16, 1.0))
# A shape faster than this is timed again while the budget lasts, and its fastest time kept: a
# tiny task's time is its cost plus whatever else the machine did meanwhile.
NOISY_SECONDS = 0.5
REPEATS = 2
# Seconds after which a calibration adds no more optional timings (fused extras, repeats): an MLP
# calibration takes ~1.5-2 s in all; an LSTM's, GRU's or Transformer's SHAPES alone take 2-4 s.
BUDGET_SECONDS = 3.0
# The width of a whole group where fused groups have no cap (a GPU).
UNCAPPED_GROUP = 64


def _length_for_rows(spec: ModelSpec, rows: int) -> int:
    """The shortest series length that yields `rows` training windows."""
    length = max(spec.min_length(), rows + spec.window + spec.horizon)
    while spec.train_windows(length) < rows:
        length += 1
    return length


def calibrate(
    spec: ModelSpec, strategy: str, device: str, shortest: int, longest: int, max_rows: int = 1024,
    budget_seconds: float = BUDGET_SECONDS,
) -> list[tuple[TaskWork, float]]:  # fmt: skip
    """Time tiny tasks of `spec` under `strategy` on `device`; return (work, seconds) observations.

    `shortest` and `longest` are the training-window counts of the run's networks; the calibration
    spans them, capped at `max_rows` windows and two epochs. SHAPES are always timed; FUSED_EXTRAS
    and repeats of shapes under NOISY_SECONDS only until `budget_seconds` have passed (0: SHAPES once).
    """
    spec = spec.model_copy(update={"epochs_per_iteration": min(spec.epochs_per_iteration, 2),
                                   "expanding_window": False})  # fmt: skip
    low, high = max(1, min(shortest, max_rows)), max(1, min(longest, max_rows))
    shapes = list(SHAPES)
    if effective_strategy(spec, strategy) == "fused":
        group = fused_width(spec.architecture, device) or UNCAPPED_GROUP
        shapes += [(group if networks is None else networks, share) for networks, share in FUSED_EXTRAS]
    rng = np.random.default_rng(0)
    fastest: dict[int, tuple[TaskWork, float]] = {}
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="manynets-calibration-") as folder:

        def time_shape(shape: int, repeat: int) -> None:
            networks, share = shapes[shape]
            rows = round(low + share * (high - low))
            length = _length_for_rows(spec, rows)
            ids = [f"calibration-{shape}-{repeat}-{k}" for k in range(networks)]  # fresh ids: none is done yet
            for series_id in ids:
                stage_values(folder, series_id, rng.normal(size=length).astype(np.float32))
            started = time.perf_counter()
            result = train_shard_iteration(shape, ids, spec, 1, folder, device, strategy=strategy)
            seconds = time.perf_counter() - started
            if shape == 0 or any(n.status != "trained" for n in result.networks):
                return  # the warm-up pays one-time costs; a failed shape measures nothing useful
            if shape not in fastest or seconds < fastest[shape][1]:
                work = describe_task([spec.train_windows(length)] * networks, spec, strategy, device)
                fastest[shape] = (work, seconds)

        def within_budget() -> bool:
            return time.perf_counter() - started_all < budget_seconds

        for shape in range(len(shapes)):
            if shape < len(SHAPES) or within_budget():
                time_shape(shape, 0)
        for repeat in range(1, REPEATS):
            for shape, (_, seconds) in sorted(fastest.items()):
                if seconds < NOISY_SECONDS and within_budget():
                    time_shape(shape, repeat)
    return [fastest[shape] for shape in sorted(fastest)]


def prior_from(observations: list[tuple[TaskWork, float]]) -> dict[tuple[str, str, str], np.ndarray]:
    """Cost-model prior coefficients per key, fitted on calibration observations."""
    prior = {}
    for key in {work.key for work, _ in observations}:
        mine = [(w.vector(), s) for w, s in observations if w.key == key]
        prior[key] = fit_coefficients(np.array([v for v, _ in mine]), np.array([s for _, s in mine]))
    return prior
