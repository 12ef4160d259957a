"""Predict the seconds of one iteration task from what it trains, and refit from observed times.

A task's time is modelled as a non-negative linear function of four features, fitted separately
for each (architecture, strategy, device):

    seconds = c_task + c_network * networks + c_work * sample_work + c_step * steps

`c_task` is the fixed cost inside a task, `c_network` what each network costs whatever its size
(building, loading, checkpointing), `c_work` the arithmetic and `c_step` the per-step Python and
launch overhead. The Prefect + Dask overhead around a task is measured apart (by the flow and in the report)
because the task's own clock cannot see it. Fits minimise the squared *relative* error, so short
and long tasks count alike, which is what a median absolute percentage error judges.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from models import ModelSpec, build_model
from tasks.fused import FUSABLE, fused_width

FEATURES = ("task", "networks", "sample_work", "steps")
HISTORY_FILE = "cost_history.parquet"


@dataclass(frozen=True)
class TaskWork:
    """What one task trains, in the terms the cost model predicts from."""

    architecture: str
    strategy: str  # the strategy that really runs: "fused" only for a fusable architecture
    device: str  # "cpu" or "cuda"
    networks: int
    sample_work: float  # sum over networks of training windows x epochs x multiply-adds per window
    steps: int  # optimiser steps the task's Python loop runs

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.architecture, self.strategy, self.device)

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.networks, self.sample_work, self.steps])


def effective_strategy(spec: ModelSpec, strategy: str | Mapping[str, str]) -> str:
    """The strategy a shard of `spec` networks really runs under `strategy`.

    `strategy` is one strategy for every architecture or a mapping architecture -> strategy (what
    the automatic choice resolves to; an architecture it does not name trains one by one).
    """
    if isinstance(strategy, Mapping):
        strategy = strategy.get(spec.architecture, "one_by_one")
    return "fused" if strategy == "fused" and spec.architecture in FUSABLE else "one_by_one"


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


_MACS: dict[str, float] = {}


def macs_per_window(spec: ModelSpec) -> float:
    """Multiply-adds of one forward pass over one window.

    MLP: its parameters. LSTM/GRU: parameters times time steps (every weight is used at every
    step). Transformer: the encoder's weights at every position plus attention's scores and
    weighted sums (2 x window^2 x width per layer); the position table is added, not multiplied.
    """
    fingerprint = spec.fingerprint()
    if fingerprint not in _MACS:
        with torch.device("meta"):
            model = build_model(spec)
        params = sum(p.numel() for p in model.parameters())
        if spec.architecture in ("lstm", "gru"):
            macs = params * spec.window
        elif spec.architecture == "transformer":
            encoder = sum(p.numel() for p in model.encoder.parameters()) + model.embed.weight.numel()
            macs = encoder * spec.window + 2 * spec.window**2 * spec.hidden * spec.layers + model.head.weight.numel()
        else:
            macs = params
        _MACS[fingerprint] = float(macs)
    return _MACS[fingerprint]


def describe_task(
    rows: Sequence[int], spec: ModelSpec, strategy: str, device: str,
    widths: Mapping[tuple[str, str], int | None] | None = None,
) -> TaskWork:  # fmt: skip
    """The features of one task training networks with `rows` training windows each under `spec`.

    `widths` maps (architecture, device kind) to the fused group width the workers use (a
    CostModel's `widths`, reported by a worker); an architecture it lacks gets this process's own
    tasks.fused.fused_width, which is right where the task itself runs.
    """
    run = effective_strategy(spec, strategy)
    epochs, batch = spec.epochs_per_iteration, spec.batch_size
    batches = [math.ceil(r / batch) for r in rows]
    if run == "fused":
        # A step serves every network of a fused group that still has a batch: each group's longest
        # network sets its count, groups formed longest first (tasks.fused.fused_width).
        ordered = sorted(batches, reverse=True)
        key = (spec.architecture, device_kind(device))
        width = widths[key] if widths is not None and key in widths else fused_width(spec.architecture, device)
        width = width or max(1, len(ordered))
        steps = epochs * sum(ordered[start] for start in range(0, len(ordered), width))
    else:
        steps = epochs * sum(batches)
    return TaskWork(spec.architecture, run, device_kind(device), len(rows),
                    epochs * float(sum(rows)) * macs_per_window(spec), steps)  # fmt: skip


def fit_coefficients(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative error of features @ c against seconds.

    Exact non-negative least squares for four features: every subset of columns is solved and the
    best solution with no negative coefficient wins.
    """
    seconds = np.maximum(np.asarray(seconds, dtype=float), 1e-6)
    design = np.asarray(features, dtype=float) / seconds[:, None]
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    design = design / scale
    target = np.ones(len(seconds))
    best, best_residual = np.zeros(design.shape[1]), float(len(seconds))  # all-zero: residual n
    for size in range(1, design.shape[1] + 1):
        for columns in itertools.combinations(range(design.shape[1]), size):
            solution, *_ = np.linalg.lstsq(design[:, columns], target, rcond=None)
            if (solution < 0).any():
                continue
            residual = float(((design[:, columns] @ solution - target) ** 2).sum())
            if residual < best_residual - 1e-12:
                best = np.zeros(design.shape[1])
                best[list(columns)] = solution
                best_residual = residual
    return best / scale


class CostModel:
    """Seconds of a task per (architecture, strategy, device): a prior, refitted as tasks report.

    With fewer than `min_fit` observations of a key the prior's prediction is scaled by the median
    ratio observed/predicted so far; from `min_fit` on the coefficients are refitted from the
    observations alone. `predict` raises KeyError for a key with neither prior nor observations:
    calibrate it first.
    """

    def __init__(self, prior: dict[tuple[str, str, str], np.ndarray] | None = None, min_fit: int = 8):
        self.prior = dict(prior or {})
        self.min_fit = min_fit
        self._features: dict[tuple, list[np.ndarray]] = {}
        self._seconds: dict[tuple, list[float]] = {}
        self._fitted: dict[tuple, tuple[int, np.ndarray]] = {}
        self.observed: list[dict] = []
        # (architecture, device kind) -> the fused group width the workers use (None: whole shard), as a
        # worker reported it; describe the run's tasks with describe_task(..., widths=model.widths).
        self.widths: dict[tuple[str, str], int | None] = {}

    def knows(self, key: tuple[str, str, str]) -> bool:
        return key in self.prior or bool(self._seconds.get(key))

    def observe(self, work: TaskWork, seconds: float) -> None:
        """Record that a task with `work` took `seconds` (its own clock, overhead excluded)."""
        if not (seconds > 0 and math.isfinite(seconds)) or work.networks == 0:
            return
        self._features.setdefault(work.key, []).append(work.vector())
        self._seconds.setdefault(work.key, []).append(float(seconds))
        self.observed.append({**asdict(work), "seconds": float(seconds)})

    def coefficients(self, key: tuple[str, str, str]) -> np.ndarray:
        """The linear coefficients (in FEATURES order) in use for `key` now."""
        seconds = self._seconds.get(key, [])
        if len(seconds) >= self.min_fit or (seconds and key not in self.prior):
            cached = self._fitted.get(key)
            if cached is None or cached[0] != len(seconds):
                cached = (len(seconds), fit_coefficients(np.array(self._features[key]), np.array(seconds)))
                self._fitted[key] = cached
            return cached[1]
        prior = self.prior[key]
        if not seconds:
            return prior
        predicted = np.array(self._features[key]) @ prior
        ratio = float(np.median(np.array(seconds) / np.maximum(predicted, 1e-9)))
        return prior * ratio

    def predict(self, work: TaskWork) -> float:
        """Predicted seconds of a task with `work` (0 for an empty task)."""
        if work.networks == 0:
            return 0.0
        return float(work.vector() @ self.coefficients(work.key))

    def observations(self) -> pd.DataFrame:
        """Everything observed so far, one row per task: the history a later run starts from."""
        columns = [*TaskWork.__dataclass_fields__, "seconds"]
        return pd.DataFrame(self.observed, columns=columns)

    @classmethod
    def from_history(cls, history: pd.DataFrame, min_fit: int = 8) -> CostModel:
        """A model whose prior is fitted on an earlier run's observations (see `observations`)."""
        prior = {}
        for key, rows in history.groupby(["architecture", "strategy", "device"]):
            features = rows[["networks", "sample_work", "steps"]].to_numpy(dtype=float)
            features = np.column_stack([np.ones(len(rows)), features])
            prior[tuple(key)] = fit_coefficients(features, rows["seconds"].to_numpy())
        return cls(prior, min_fit)


def load_history(output_dir: str | Path) -> pd.DataFrame | None:
    """The task observations kept by earlier runs in `output_dir`, or None."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception:  # a damaged history only costs a calibration
        return None


def save_history(output_dir: str | Path, model: CostModel, keep: int = 20_000) -> Path:
    """Append this run's observations to the history in `output_dir` (keeping the newest `keep` rows)."""
    from tasks.results import write_parquet  # imported here: tasks.results imports tasks.training

    frames = [f for f in (load_history(output_dir), model.observations()) if f is not None and len(f)]
    history = pd.concat(frames, ignore_index=True).tail(keep) if frames else model.observations()
    return write_parquet(history, Path(output_dir) / HISTORY_FILE)


def percentage_errors(predicted: pd.Series, actual: pd.Series) -> pd.Series:
    """Signed (predicted - actual) / actual in percent, where both are known and actual > 0."""
    known = predicted.notna() & actual.notna() & (actual > 0)
    return ((predicted[known] - actual[known]) / actual[known] * 100).astype(float)
