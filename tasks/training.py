"""Train one iteration (a block of epochs ending in a checkpoint) of one network, or of a shard.

Every network is rebuilt from its own checkpoint at each iteration and nothing is kept between
calls, so the time a network takes depends on its data alone, not on how many came before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models import ModelSpec, build_model, gpu_recurrent, native
from models.spec import ARCHITECTURES
from tasks.series import Windows, make_windows
from tasks.storage import (
    checkpoint_body,
    checkpoint_iterations,
    checkpoint_path,
    journal_event,
    journal_recovered_done,
    latest_valid_checkpoint,
    network_dir,
    prune_checkpoints,
    read_values,
    write_checkpoint_body,
)

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
NETWORK_ATTEMPTS = 2  # a network that raises is retried once, in the same task, before it is failed


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite; the network keeps its last good checkpoint."""


@dataclass
class NetworkOutcome:
    """What one iteration task did for one network."""

    series_id: str
    status: str  # "trained", "stopped" (early stopping: trains no more) or "failed"
    iteration: int  # newest iteration with a checkpoint after this task
    train_loss: float | None = None
    val_loss: float | None = None
    train_windows: int = 0
    seconds: float = 0.0  # training time spent on this network in this task
    checkpoint: str | None = None
    skipped: bool = False  # the iteration was already checkpointed: nothing was trained
    error: str | None = None  # why it failed, or why it stopped early
    notes: list[str] = field(default_factory=list)


@dataclass
class IterationResult:
    """What one task (one iteration of one shard) did, and when and where it ran."""

    shard_id: int
    iteration: int
    networks: list[NetworkOutcome]
    worker: str
    started: float  # unix seconds
    finished: float
    out_of_memory: str | None = None  # set when the task stopped early for lack of memory
    strategy: str = "one_by_one"  # what the task was asked to run ("fused" fuses what it can)
    # Filled in on the way back: the priority the Dask worker held the task under, and, by the
    # driver, when it was submitted, what the cost model predicted and the priority it asked for.
    dask_priority: int | None = None
    submitted: float | None = None
    predicted_seconds: float | None = None
    priority: int | None = None

    @property
    def wall_seconds(self) -> float:
        return self.finished - self.started


def network_seed(base_seed: int, series_id: str) -> int:
    """A stable per-network seed: the same series and base seed give the same network everywhere."""
    digest = hashlib.sha256(f"{base_seed}:{series_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Progress:
    """What a network carries between epochs and iterations besides its weights (kept in checkpoint metrics)."""

    epochs_trained: int = 0
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    stopped: bool = False

    @classmethod
    def from_metrics(cls, metrics: dict | None, spec: ModelSpec, done: int) -> "Progress":
        """Resume from a checkpoint's metrics (checkpoints older than these fields: full epochs, no best)."""
        if not metrics:
            return cls()
        return cls(
            int(metrics.get("epochs_trained", done * spec.epochs_per_iteration)),
            float(metrics.get("best_val_loss", math.inf)), int(metrics.get("epochs_since_best", 0)),
            bool(metrics.get("stopped", False)),
        )  # fmt: skip

    def as_metrics(self) -> dict:
        return {"epochs_trained": self.epochs_trained, "best_val_loss": self.best_val_loss,
                "epochs_since_best": self.epochs_since_best, "stopped": self.stopped}  # fmt: skip

    def after_epoch(self, val_loss: float | None, spec: ModelSpec) -> None:
        """Count an epoch; with early stopping on, judge its validation loss and maybe stop."""
        self.epochs_trained += 1
        if spec.early_stopping_patience is None or val_loss is None:
            return
        if val_loss < self.best_val_loss - spec.early_stopping_min_delta:
            self.best_val_loss, self.epochs_since_best = val_loss, 0
        else:
            self.epochs_since_best += 1
            self.stopped = self.epochs_since_best >= spec.early_stopping_patience


def stop_reason(spec: ModelSpec, progress: Progress) -> str:
    """Why an early-stopped network stopped, for the results table."""
    return (f"stopped early after {progress.epochs_trained} epochs: validation loss did not improve on "
            f"{progress.best_val_loss:.4g} for {spec.early_stopping_patience} epochs")  # fmt: skip


def fit_epochs(
    model, optimizer, x, y, spec: ModelSpec, generator: torch.Generator, progress: Progress, x_val=None, y_val=None
) -> float:
    """Train up to spec.epochs_per_iteration passes of shuffled mini-batches; return the last epoch's mean loss.

    Each epoch runs at the network's scheduled learning rate, clips its gradient when the spec
    says so, and, with early stopping on, ends the iteration early once `progress` says stop
    (x_val/y_val are then required). `progress` is updated in place.
    """
    n = x.shape[0]
    for _ in range(spec.epochs_per_iteration):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = spec.learning_rate_at(progress.epochs_trained)
        order = torch.randperm(n, generator=generator).to(x.device)
        # Summed on the device and read once per epoch: no host sync per step.
        total = torch.zeros((), device=x.device)
        for start in range(0, n, spec.batch_size):
            idx = order[start : start + spec.batch_size]
            with spec.autocast(x.device):
                prediction = model(x[idx])
            loss = F.mse_loss(prediction.float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            total += loss.detach() * idx.numel()
        mean = float(total) / n
        if not math.isfinite(mean):
            raise NonFiniteLoss(f"training loss became {mean}")
        watching = spec.early_stopping_patience is not None
        progress.after_epoch(evaluate(model, x_val, y_val, spec) if watching else None, spec)
        if progress.stopped:
            break
    return mean


@torch.no_grad()
def evaluate(model, x, y, spec: ModelSpec | None = None) -> float:
    """Mean squared error on held-out windows (normalised scale), under the spec's precision."""
    model.eval()
    with spec.autocast(x.device) if spec is not None else contextlib.nullcontext():
        prediction = model(x)
    return float(F.mse_loss(prediction.float(), y))


def train_network_iteration(
    series_id: str, spec: ModelSpec, iteration: int, output_dir: str, device: str = "cpu"
) -> NetworkOutcome:
    """Bring one network to `iteration`, resuming from its newest good checkpoint.

    Idempotent: if iteration `iteration` is already checkpointed it returns that checkpoint's
    metrics and trains nothing. If earlier checkpoints are missing or corrupt it retrains the gap,
    so the result equals an uninterrupted run's. Raises on failure; the caller decides what fails.
    """
    folder = network_dir(output_dir, series_id)
    # A network already past `iteration` (its checkpoint of `iteration` pruned) has nothing to redo.
    newest = max(checkpoint_iterations(folder), default=0)
    done, state, problems = latest_valid_checkpoint(folder, below=max(iteration, newest) + 1)
    if state is not None and state["spec"] != spec.fingerprint():
        raise ValueError(
            f"checkpoint in {folder} was trained with another model spec ({state['spec']} != "
            f"{spec.fingerprint()}); use a new output_dir or delete the old run"
        )
    if state is not None:
        journal_recovered_done(folder, done)
    progress = Progress.from_metrics(state["metrics"] if state else None, spec, done)
    if done >= iteration or progress.stopped:
        metrics = state["metrics"]
        stopped = progress.stopped
        return NetworkOutcome(
            series_id, "stopped" if stopped else "trained", done, metrics["train_loss"], metrics["val_loss"],
            metrics["train_windows"], 0.0, str(checkpoint_path(folder, done)), skipped=True, notes=problems,
            error=stop_reason(spec, progress) if stopped else None,
        )  # fmt: skip

    started = time.perf_counter()
    windows = make_windows(read_values(output_dir, series_id), spec)
    generator = torch.Generator().manual_seed(network_seed(spec.seed, series_id))
    model = build_model(spec, generator).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
    x_all, y_all, x_val, y_val = (
        torch.tensor(a, device=device) for a in (windows.x_train, windows.y_train, windows.x_val, windows.y_val)
    )
    worker = _worker_name()
    for step in range(done + 1, iteration + 1):
        journal_event(folder, "start", step, worker)
        rows = spec.training_rows(x_all.shape[0], step)
        x_train, y_train = x_all[:rows], y_all[:rows]
        train_loss = fit_epochs(model, optimizer, x_train, y_train, spec, generator, progress, x_val, y_val)
        val_loss = evaluate(model, x_val, y_val, spec)
        metrics = {"train_loss": train_loss, "val_loss": val_loss, "train_windows": int(x_train.shape[0]),
                   **progress.as_metrics()}  # fmt: skip
        save_iteration(folder, step, spec, model.state_dict(), optimizer.state_dict(), generator, metrics,
                       windows, worker)  # fmt: skip
        if progress.stopped:
            break
    return NetworkOutcome(
        series_id, "stopped" if progress.stopped else "trained", step, train_loss, val_loss, int(x_train.shape[0]),
        time.perf_counter() - started, str(checkpoint_path(folder, step)), notes=problems,
        error=stop_reason(spec, progress) if progress.stopped else None,
    )  # fmt: skip


def warm_up(device: str = "cpu", architectures: tuple[str, ...] = ARCHITECTURES) -> None:
    """Pay PyTorch's one-time costs in this process (lazy imports, first autograd and Adam steps).

    Without it the first network a fresh worker trains takes ~1.7 s instead of ~20 ms here, which
    would be charged to whichever network happens to come first. Only `architectures` are warmed:
    all four take ~1 s, which a run of MLPs alone need not wait for.
    """
    if device == "cpu" and architectures:  # every architecture has compiled CPU code
        native.load()  # built once per machine (~1.5 min; `make install` does it), then loaded: never in a timed task
    if "lstm" in architectures:
        gpu_recurrent.warm_up(device)  # its Triton kernels, compiled (or read from Triton's cache) on a GPU
    generator = torch.Generator().manual_seed(0)
    for architecture in architectures:
        spec = ModelSpec(architecture=architecture, hidden=4, layers=1, heads=1, window=4, horizon=2, batch_size=4,
                         epochs_per_iteration=1)  # fmt: skip
        model = build_model(spec, generator).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
        x, y = torch.randn(8, 4, device=device), torch.randn(8, 2, device=device)
        fit_epochs(model, optimizer, x, y, spec, generator, Progress())
        evaluate(model, x, y)


def save_iteration(
    folder, step: int, spec: ModelSpec, model_state: dict, optimizer_state: dict, generator: torch.Generator,
    metrics: dict, windows: Windows, worker: str,
) -> None:  # fmt: skip
    """Checkpoint a network after iteration `step`, journal it and prune old checkpoints.

    The one checkpoint format, whichever strategy trained the network: any strategy can resume it
    (the fused path encodes the same state for a whole group with checkpoint_bodies).
    `optimizer_state` is in torch.optim.Adam's state-dict layout.
    """
    state = {**checkpoint_values(step, spec.fingerprint(), metrics, windows),
             **checkpoint_tensors(model_state, optimizer_state, generator.get_state())}  # fmt: skip
    write_iteration(folder, step, checkpoint_body(state), worker)


def checkpoint_values(step: int, fingerprint: str, metrics: dict, windows: Windows) -> dict:
    """The part of a network's checkpoint that holds no tensors (first in its state)."""
    return {"iteration": step, "spec": fingerprint, "metrics": metrics,
            "scale": {"mean": windows.mean, "std": windows.std}}  # fmt: skip


def checkpoint_tensors(model_state: dict, optimizer_state: dict, generator_state: torch.Tensor) -> dict:
    """The part of a network's checkpoint that holds its tensors: weights, Adam state, RNG state.

    The fused path passes tensors stacked over its networks (see checkpoint_bodies)."""
    return {"model": {k: v.cpu() for k, v in model_state.items()}, "optimizer": _to_cpu(optimizer_state),
            "generator": generator_state}  # fmt: skip


def write_iteration(
    folder, step: int, body: bytes | tuple, worker: str, checkpoints: list[int] | None = None
) -> None:
    """Write a network's checkpoint body for iteration `step`, journal it and prune old checkpoints.

    `checkpoints`: the iterations the folder holds with this one, where the caller knows them (else listed).
    """
    write_checkpoint_body(checkpoint_path(folder, step), body)
    journal_event(folder, "done", step, worker)
    prune_checkpoints(folder, KEEP_CHECKPOINTS, checkpoints)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def failed_outcome(
    series_id: str, output_dir: str, done: int, error: str, seconds: float = 0.0, notes: list[str] | None = None
) -> NetworkOutcome:
    """A `failed` outcome for a network whose newest good checkpoint is iteration `done` (0: none)."""
    folder = network_dir(output_dir, series_id)
    return NetworkOutcome(
        series_id, "failed", done, seconds=seconds, checkpoint=str(checkpoint_path(folder, done)) if done else None,
        error=error, notes=notes or [],
    )  # fmt: skip


def _out_of_memory(exc: BaseException, what: str, device: str) -> str:
    """Describe an out-of-memory error for the caller that halves the shard, and free CUDA's cache."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return f"{type(exc).__name__} while training {what}: {exc}"


def train_network_with_retries(
    series_id: str, spec: ModelSpec, iteration: int, output_dir: str, device: str, attempts: int
) -> NetworkOutcome:
    """train_network_iteration, retried up to `attempts` times; a `failed` outcome if all raise.

    Each attempt resumes from the newest good checkpoint, so a retry redoes only the iteration
    that raised. Running out of memory is not the network's fault and propagates at once.
    """
    began = time.perf_counter()
    for attempt in range(1, attempts + 1):
        try:
            return train_network_iteration(series_id, spec, iteration, output_dir, device)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("network %r, iteration %d, attempt %d/%d failed:\n%s",
                           series_id, iteration, attempt, attempts, traceback.format_exc())  # fmt: skip
    done, _, _ = latest_valid_checkpoint(network_dir(output_dir, series_id), below=iteration)
    return failed_outcome(series_id, output_dir, done, f"{error} (after {attempts} attempts)",
                          seconds=time.perf_counter() - began)  # fmt: skip


STRATEGIES = ("one_by_one", "fused")


def train_shard_iteration(
    shard_id: int, series_ids: list[str], spec: ModelSpec, iteration: int, output_dir: str,
    device: str = "cpu", attempts: int = NETWORK_ATTEMPTS, strategy: str = "one_by_one",
) -> IterationResult:  # fmt: skip
    """Train iteration `iteration` of every network of a shard.

    `strategy="fused"` trains the shard's networks together as one computation where the
    architecture allows (tasks.fused); the rest, and every network under "one_by_one", are trained
    one after another. A network that still raises after `attempts` tries is reported `failed`
    with its error and the others go on. Running out of memory (host or CUDA) stops the task early
    with `out_of_memory` set: the networks finished so far are checkpointed and reported, and the
    caller splits the rest into smaller shards.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    with spec.float32_math(device):
        return _train_shard_iteration(shard_id, series_ids, spec, iteration, output_dir, device, attempts, strategy)


def _train_shard_iteration(
    shard_id: int, series_ids: list[str], spec: ModelSpec, iteration: int, output_dir: str, device: str,
    attempts: int, strategy: str,
) -> IterationResult:  # fmt: skip
    started = time.time()
    outcomes: list[NetworkOutcome] = []
    out_of_memory = None
    fused: dict[str, NetworkOutcome] = {}
    if strategy == "fused":
        from tasks.fused import train_fusable_part  # imported here: tasks.fused imports this module

        try:
            fused = train_fusable_part(series_ids, spec, iteration, output_dir, device, _worker_name())
        except (MemoryError, torch.OutOfMemoryError) as exc:
            out_of_memory = _out_of_memory(exc, f"{len(series_ids)} networks fused", device)
            return IterationResult(shard_id, iteration, [], _worker_name(), started, time.time(), out_of_memory,
                                   strategy)  # fmt: skip
    for series_id in series_ids:
        if series_id in fused:
            outcomes.append(fused[series_id])
            continue
        try:
            outcomes.append(train_network_with_retries(series_id, spec, iteration, output_dir, device, attempts))
        except (MemoryError, torch.OutOfMemoryError) as exc:
            out_of_memory = _out_of_memory(exc, repr(series_id), device)
            break
    return IterationResult(shard_id, iteration, outcomes, _worker_name(), started, time.time(), out_of_memory,
                           strategy)  # fmt: skip
