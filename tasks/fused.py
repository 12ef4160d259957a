"""Train one iteration of many same-shaped networks as one computation (the fused strategy).

Each network keeps its own data, shuffling, loss, Adam state and checkpoint: the result equals
training it alone within float tolerance (tests/test_fused.py checks this). Networks of different
lengths share one flat array of windows, gathered by index with per-network masks, so no network
sees another's data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models import ModelSpec, build_model, fresh_weights, gpu_recurrent, native
from models.spec import ARCHITECTURES
from models.stacked import StackedAdam, StackedNetworks, stack
from tasks.series import Windows, for_iteration, make_windows, window_values
from tasks.storage import (
    checkpoint_bodies,
    checkpoint_path,
    journal_event,
    journal_recovered_done,
    network_dir,
    read_values,
)

if TYPE_CHECKING:
    from tasks.training import Progress

FUSABLE = ARCHITECTURES
CHECKPOINT_WRITERS = 4
_NO_ROWS = torch.empty(0, dtype=torch.long)


def fused_width(architecture: str, device: str) -> int | None:
    """How many networks one fused computation holds at most on `device` (None: the whole shard).

    Measured on this 2-core CPU, one thread. Per network, wide groups stop paying once activations outgrow the
    cache: stacked GRUs were 1.5x cheaper than a loop at 16 networks and no cheaper at 64, the Transformer's best
    was 4-16 (`python -m benchmarks.stacking`, on earlier code). For MLPs 128 was the best width while each
    parameter had its own optimizer tensors (1660 MLPs: 11.1 s in groups of 512, 10.2 s of 256, 9.8 s of 128, 10.8 s
    of 64); since the stack is one (K, P) matrix the width hardly matters (15.2-15.9 s for 32 to 256 on a slower
    day, `python -m benchmarks.fused_width --widths 256 128 64 32`), and with the compiled MLP step
    (models/native.py), which runs one network at a time, 128 and 256 tie (5.6 / 6.0 s and 5.5 / 6.1 s; 512: 6.4 /
    6.3 s, 64: 6.7 / 6.4 s; `--architecture mlp --networks 1660 --epochs 5 --widths 128 256 512 64 128 256 512 64`).
    Stacked LSTMs, whose projections are a third larger than the GRU's, are cheapest in groups of 8: 64 LSTMs, one
    epoch, 13.4 / 13.6 s in groups of 8 against 15.9 / 16.7 s of 16 and 16.1 / 15.0 s of 4 (`python -m
    benchmarks.fused_width --architecture lstm --networks 64 --epochs 1 --widths 16 8 4 16 8 4`); GRUs of 16 and 8
    tied (7.8 / 9.4 s, 8.5 / 9.5 s; 32: 10.3 / 10.7 s); Transformers of 8 beat 16 (64 networks: 22.6 / 23.4 s
    against 25.1 / 25.1 s; 4: 21.0 / 25.3 s), and still do since the stacked Transformer computes only what its head
    reads: one training step, per network, 6.1 / 5.4 / 5.1 / 6.3 ms at 2 / 4 / 8 / 16 (`python -m
    benchmarks.compiled_recurrent --architectures transformer --widths 2 4 8 16 --repeats 7`). Those LSTM/GRU widths
    were for the eager stacked layer; the compiled one (models/native.py) is best in groups of 2-8: one training
    step of two-layer LSTMs, per network, took 3.9 / 3.7 / 3.8 / 4.2 ms at 2 / 4 / 8 / 16 networks (`nn.LSTM` one by
    one: 5.2-5.3 ms), of GRUs 3.4 / 3.3 / 3.5 / 5.9 ms (`nn.GRU`: 9.7-10.0 ms; `python -m
    benchmarks.compiled_recurrent`); one fused iteration of 64 GRUs, one epoch, took 3.5 / 3.5 s in groups of 2, 3.7
    / 4.1 s of 4 and 5.7 / 5.9 s of 16, of 64 LSTMs 4.2 / 4.4 s of 2, 4.5 / 4.4 s of 4 and 5.3 / 5.1 s of 8 (`python
    -m benchmarks.fused_width --architecture gru --networks 64 --epochs 1 --widths 4 2 4 2`); at 256 networks 2 and
    4 tie (`--widths 4 2 4 2 4 2`: LSTMs 13.4 / 14.5 / 14.7 s of 4 against 14.0 / 14.3 / 14.4 s of 2, GRUs 11.4 /
    11.0 / 11.1 s against 11.7 / 11.3 / 11.3 s), and 4 means half the groups. The recurrent and attention cap also
    keeps those fused tasks within the widths calibration times (tasks/calibration.py), so the strategy choice does
    not rest on extrapolation. A GPU is kept busy by one group of any of these shards (no cap), but for LSTMs on the
    Triton layer (models/gpu_recurrent.py): there a group's checkpoints are encoded and written while the next group
    trains, and one iteration of 1660 LSTMs on an H100 took 2.22 s in groups of 415 against 2.57 s in groups of 830
    and 2.73 / 2.74 s in one (`python -m benchmarks.fused_vs_loop --device cuda --architectures lstm --fused-widths
    830 415`; the one group from `benchmarks.fused_phases`, warm, as the widths were). 415 is the narrowest width
    measured. A wider shard trains as consecutive groups, longest networks together.
    """
    if device.startswith("cuda"):
        return 415 if architecture == "lstm" and gpu_recurrent.available() else None
    if architecture in {"lstm", "gru"} and native.load() is not None:
        return 4
    return {"mlp": 128, "gru": 16}.get(architecture, 8)


def fused_widths(architectures: Iterable[str], device: str) -> dict[str, int | None]:
    """fused_width of each architecture as this process would train it: run on a worker for the flow's plan.

    The compiled recurrent layer, and with it the LSTM/GRU width, depends on the machine (a
    compiler, its CPU flags). The flow plans with the workers' answer, so the flow's own machine
    never builds the layer and a flow machine without a compiler plans the widths the workers use.
    """
    return {architecture: fused_width(architecture, device) for architecture in architectures}


@dataclass
class FusedMember:
    """One network entering a fused iteration: its data, generator and resumed state."""

    series_id: str
    windows: Windows
    generator: torch.Generator
    weights: dict[str, torch.Tensor]  # parameters by state-dict name
    optimizer_state: dict | None
    progress: Progress
    # The checkpoints its folder held when the shard started: pruning after the new one is written
    # needs no second listing (~0.36 ms a folder on the H200 machine's disk, under cProfile).
    checkpoints: list[int] = field(default_factory=list)


def prepare_member(
    series_id: str, spec: ModelSpec, state: dict | None, output_dir: str, seed: int, iteration: int,
    template: torch.nn.Module, progress: Progress,
) -> FusedMember:  # fmt: skip
    """Load one network's data for `iteration` and its state exactly as the one-by-one path would.

    `template` is a model of `spec` whose init plan draws the weights of a network that has no
    checkpoint yet (the weights, and the generator's state after drawing them, are those
    `build_model` would give);
    `progress` is what its checkpoint says of its epochs and early stopping.
    """
    windows = for_iteration(make_windows(read_values(output_dir, series_id), spec), spec, iteration)
    generator = torch.Generator().manual_seed(seed)
    if state is None:
        weights, optimizer_state = fresh_weights(template, generator), None
    else:
        weights, optimizer_state = state["model"], state["optimizer"]
        generator.set_state(state["generator"])
    return FusedMember(series_id, windows, generator, weights, optimizer_state, progress)


def _flat_pairs(
    xs: list[np.ndarray], ys: list[np.ndarray], device
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:  # fmt: skip
    """Ragged (input, target) windows of many networks as two views, (rows, window) and (rows,
    horizon), and each network's first row.

    The networks' values are concatenated once and unfolded, so row starts[k] + i of either view
    is network k's pair i and no window is ever materialised: the windows themselves are window +
    horizon times larger (400 MB for the 1660 bundled series, 1.4 s to concatenate) and pushed
    every batch out of the cache. Batches are gathered by global row index; nothing is padded.
    Inputs and targets are gathered apart, so both come out contiguous: the loss over a strided
    slice of (input, target) rows cost 4x (0.17 against 0.04 ms for 128 MLPs' batch).
    """
    segments = [window_values(x, y) for x, y in zip(xs, ys)]
    lengths = torch.tensor([len(segment) for segment in segments])
    values = torch.from_numpy(np.concatenate(segments)).to(device)
    window, horizon = xs[0].shape[1], ys[0].shape[1]
    rows = len(values) - window - horizon + 1
    inputs, targets = values.unfold(0, window, 1)[:rows], values[window:].unfold(0, horizon, 1)[:rows]
    return (inputs, targets), (torch.cumsum(lengths, 0) - lengths).to(device)


def _rows(starts: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (K, width) of each network's first `width` rows, and which of them are real."""
    offsets = torch.arange(width, device=starts.device).unsqueeze(0)
    real = offsets < counts.to(starts.device).unsqueeze(1)
    return torch.where(real, starts.unsqueeze(1) + offsets, 0), real


def _gather(flat: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of `rows` (K, batch) from _flat_pairs' views: (K, batch, window), (K, batch, horizon).

    index_select, not advanced indexing: 9x faster here (0.57 vs 5.1 ms for 256 x 128 windows of 32)."""
    index = rows.reshape(-1)
    return tuple(view.index_select(0, index).view(*rows.shape, view.shape[-1]) for view in flat)


def _masked_squared_error(pred, target, mask) -> torch.Tensor:
    """Per-network sum of squared errors over real rows only; (K,). `where`, not a product, so a
    network whose predictions are NaN cannot leak NaN into the others' gradients."""
    squared = F.mse_loss(pred, target, reduction="none")  # one fused backward op
    return torch.where(mask.unsqueeze(-1), squared, torch.zeros((), device=pred.device)).sum(dim=(1, 2))


def _masked_mse(pred, target, mask, full: bool) -> torch.Tensor:
    """Per-network mean squared error over real rows only; (K,). `full` says every row is real, as
    the caller knows from a host copy of the mask (reading the mask on a GPU waits for it)."""
    # The usual step: no masking pass (0.42 vs 1.15 ms with its backward, 128 MLPs, with the earlier formula).
    if full:
        return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2))
    return _masked_squared_error(pred, target, mask) / (mask.sum(dim=1).clamp(min=1) * pred.shape[-1])


def _load_optimizer_states(stacked: StackedNetworks, optimizer: StackedAdam, members: list[FusedMember]) -> None:
    """Put each resumed member's Adam state (torch.optim.Adam's layout) into the stacked optimizer."""
    states = [m.optimizer_state["state"] if m.optimizer_state else None for m in members]
    if not any(states):
        return
    zeros = [torch.zeros(shape) for shape in stacked.single_shapes]
    for matrix, key in ((optimizer.exp_avg, "exp_avg"), (optimizer.exp_avg_sq, "exp_avg_sq")):
        matrix.copy_(stacked.rows([[s[i][key] if s else zeros[i] for s in states] for i in range(len(zeros))]))
    # Adam steps all of a network's parameters together: one count per network.
    optimizer.steps.copy_(torch.tensor([float(s[0]["step"]) if s else 0.0 for s in states], dtype=torch.float64))


def _stacked_tensors(stacked: StackedNetworks, optimizer: StackedAdam, generators: list, adam_layout: dict) -> dict:
    """checkpoint_tensors of every network at once, stacked: network k's tensors are row k of each.

    The Adam state is in torch.optim.Adam's state-dict layout, so any path can resume it; its step
    is float32, as Adam keeps it.
    """
    from tasks.training import checkpoint_tensors

    step = optimizer.steps.to(torch.float32).cpu()
    state = {i: {"step": step, "exp_avg": stacked.singles(optimizer.exp_avg, i),
                 "exp_avg_sq": stacked.singles(optimizer.exp_avg_sq, i)} for i in range(len(stacked.keys))}  # fmt: skip
    model = {key: stacked.singles(stacked.weights, i) for i, key in enumerate(stacked.keys)}
    generator_states = torch.stack([generator.get_state() for generator in generators])
    return checkpoint_tensors(model, {"state": state, "param_groups": adam_layout["param_groups"]}, generator_states)


def train_fused_iteration(
    members: list[FusedMember], spec: ModelSpec, iteration: int, output_dir: str, device: str, worker: str,
    template: torch.nn.Module, writers: CheckpointWriters,
) -> dict[str, tuple[float, float, int, float] | Exception]:
    """Train iteration `iteration` of `members` together and checkpoint each network.

    Returns, per series id, (train_loss, val_loss, train_windows, seconds) or the exception that
    failed that network (a NaN/inf loss); a failed network keeps its last good checkpoint. The
    group's time is split by the windows each network trained (windows x epochs), so every
    network of a group shows the group's seconds per window. Each
    member's `progress` is updated: a network that stops early is masked out of the remaining
    steps and checkpointed where it stopped, as it would have been alone.

    Checkpoints are written from `writers` (CheckpointWriters), which also journals each
    member's start: the call returns before they are on disk, and the caller must leave `writers`
    (which waits for every write and re-raises a failed one) before reporting them.
    """
    # Imported here: tasks.training imports this module.
    from tasks.training import NonFiniteLoss, checkpoint_values, write_iteration

    started = time.perf_counter()
    # Longest first: the networks that still have a batch at step s are then always a prefix, and
    # each step computes only those (no work on networks that have finished their epoch).
    members = sorted(members, key=lambda m: -m.windows.x_train.shape[0])
    k_count = len(members)
    # Built on the device: its (K, P) gradients are zeroed there, not zeroed on the host and copied (2 x 88 MB
    # for 1660 LSTMs).
    stacked = stack(spec.architecture, [m.weights for m in members], template, device)
    optimizer = StackedAdam(stacked, lr=spec.learning_rate)
    _load_optimizer_states(stacked, optimizer, members)
    adam_layout = torch.optim.Adam(template.parameters(), lr=spec.learning_rate).state_dict()
    train_pairs, train_starts = _flat_pairs([m.windows.x_train for m in members],
                                            [m.windows.y_train for m in members], device)  # fmt: skip
    val_pairs, val_starts = _flat_pairs([m.windows.x_val for m in members], [m.windows.y_val for m in members], device)
    counts = torch.tensor([m.windows.x_train.shape[0] for m in members])
    val_counts = torch.tensor([m.windows.x_val.shape[0] for m in members])
    val_idx, val_real = _rows(val_starts, val_counts, int(val_counts.max()))
    batch = spec.batch_size
    # Networks 0..upto-1 have a batch at step s (the rest have finished their epoch).
    upto_at = [int((counts > s * batch).sum()) for s in range((int(counts.max()) + batch - 1) // batch)]
    # Who still trains this iteration: neither blown up nor stopped early.
    active = torch.ones(k_count, dtype=torch.bool)
    windows_trained = torch.zeros(k_count, dtype=torch.float64)
    last_loss = torch.full((k_count,), float("nan"))
    errors: dict[str, Exception] = {}
    watching = spec.early_stopping_patience is not None

    def validation_losses() -> torch.Tensor:
        """Each network's validation MSE, computed a training batch's width of windows at a time.

        At once, the validation windows of 1660 LSTMs (up to 492 a network) would need ~20 GB for
        their gates and states on a GPU (1660 x 32 steps x 492 x 6 x 32 floats), 4x a training step:
        in chunks it never needs more memory than a step."""
        stacked.eval()
        squared = torch.zeros(k_count, device=device)
        with torch.no_grad():
            for start in range(0, val_idx.shape[1], batch):
                real = val_real[:, start : start + batch]
                inputs, targets = _gather(val_pairs, val_idx[:, start : start + batch])
                with spec.autocast(device):
                    prediction = stacked(inputs)
                squared += _masked_squared_error(prediction.float(), targets, real)
        return (squared / (val_counts.to(device).clamp(min=1) * val_pairs[1].shape[-1])).cpu()

    for _ in range(spec.epochs_per_iteration):
        if not active.any():
            break
        stacked.train()
        windows_trained += torch.where(active, counts, 0)
        optimizer.lr.copy_(torch.tensor([spec.learning_rate_at(m.progress.epochs_trained) for m in members],
                                        dtype=torch.float64))  # fmt: skip
        # Columns up to the longest active network only: a step never computes rows no network has
        # (the last step of a short group is as wide as its longest remainder, not a whole batch).
        longest = int(counts[active].max())
        # Each network shuffles with its own generator, as alone; one that no longer trains draws nothing.
        order = torch.nn.utils.rnn.pad_sequence(
            [torch.randperm(n, generator=m.generator) if on else _NO_ROWS
             for m, n, on in zip(members, counts.tolist(), active.tolist())], batch_first=True,
        )  # fmt: skip
        order = order.to(device) + train_starts.unsqueeze(1)  # global rows; padding is masked out
        # Kept on the host too: whether a step's batch is full is read there, with no wait for a GPU.
        in_epoch_host = (torch.arange(longest).unsqueeze(0) < counts.unsqueeze(1)) & active.unsqueeze(1)
        in_epoch = in_epoch_host.to(device)
        total = torch.zeros(k_count, device=device)
        for s in range((longest + batch - 1) // batch):
            upto, columns = upto_at[s], slice(s * batch, (s + 1) * batch)
            idx, real = order[:upto, columns], in_epoch[:upto, columns]
            inputs, targets = _gather(train_pairs, idx)
            full = bool(in_epoch_host[:upto, columns].all())
            optimizer.zero_grad()
            # A compiled step (the MLP's on a CPU) computes the same losses and gradients in one call.
            losses = stacked.mse_step(inputs, targets, real, full, upto)
            if losses is None:
                with spec.autocast(device):
                    prediction = stacked(inputs, upto)
                losses = _masked_mse(prediction.float(), targets, real, full)
                losses.sum().backward()
            if spec.grad_clip is not None:
                optimizer.clip_grad_norm(spec.grad_clip, upto)
            stepping = real.any(dim=1)
            optimizer.step(stepping)
            total[:upto] += torch.where(stepping, losses.detach() * real.sum(dim=1), 0.0)
        epoch_loss = (total / counts.to(device)).cpu()
        last_loss = torch.where(active, epoch_loss, last_loss)
        blown = active & ~torch.isfinite(epoch_loss)
        for k in blown.nonzero().flatten().tolist():
            errors[members[k].series_id] = NonFiniteLoss(f"training loss became {float(epoch_loss[k])}")
        active &= ~blown
        val_now = validation_losses() if watching else None
        for k in active.nonzero().flatten().tolist():
            members[k].progress.after_epoch(float(val_now[k]) if watching else None, spec)
            active[k] = not members[k].progress.stopped
    val_losses = validation_losses()
    # Split evenly, a group's short networks were charged most of each step's fixed cost: `make
    # run`'s seconds per window then rose along every group, a staircase that was no slowdown.
    seconds = ((time.perf_counter() - started) * windows_trained / windows_trained.sum().clamp(min=1)).tolist()
    results: dict[str, tuple[float, float, int, float] | Exception] = dict(errors)
    fingerprint = spec.fingerprint()
    metrics = [{"train_loss": float(last_loss[k]), "val_loss": float(val_losses[k]), "train_windows": int(counts[k]),
                **m.progress.as_metrics()} for k, m in enumerate(members)]  # fmt: skip
    # Encoded here in bulk, so the writer threads only write: serialising each network there held
    # the GIL long enough to stall this thread (see checkpoint_bodies).
    bodies = checkpoint_bodies(
        [checkpoint_values(iteration, fingerprint, metrics[k], m.windows) for k, m in enumerate(members)],
        _stacked_tensors(stacked, optimizer, [m.generator for m in members], adam_layout),
    )  # fmt: skip
    for k, m in enumerate(members):
        if m.series_id in errors:
            continue
        writers.write(write_iteration, network_dir(output_dir, m.series_id), iteration, bodies[k], worker,
                      [*m.checkpoints, iteration])  # fmt: skip
        results[m.series_id] = (metrics[k]["train_loss"], metrics[k]["val_loss"], metrics[k]["train_windows"],
                                seconds[k])  # fmt: skip
    return results


class CheckpointWriters(ThreadPoolExecutor):
    """Threads that write a fused shard's checkpoints while it trains on; leaving waits for every write.

    Each fsync waits on the disk with the GIL released, so the next checkpoint is serialised
    meanwhile, and a group's checkpoints are written while the next group trains. Every network
    has its own folder. On leaving, a write that failed is re-raised: nothing is reported trained
    that is not on disk.
    """

    def __init__(self):
        super().__init__(max_workers=CHECKPOINT_WRITERS, thread_name_prefix="manynets-checkpoint")
        self.pending: list = []
        self._before = None

    def first(self, job) -> None:
        """Run `job` before any write submitted after this call (e.g. journaling the starts)."""
        self._before = self.submit(job)
        self.pending.append(self._before)

    def write(self, job, *args) -> None:
        """Run job(*args) in a writer thread once the `first` job is done; its failure re-raises on leaving."""
        before = self._before

        def run():
            if before is not None:
                before.result()
            return job(*args)

        self.pending.append(self.submit(run))

    def __exit__(self, *exc_info):
        super().__exit__(*exc_info)
        if exc_info[0] is None:
            for future in self.pending:
                future.result()
        return False


def train_fusable_part(
    series_ids: list[str], spec: ModelSpec, iteration: int, output_dir: str, device: str, worker: str
) -> dict:
    """Fuse the networks of a shard that are exactly one iteration behind; return their outcomes.

    Networks already done, with gaps to retrain, with a checkpoint of another spec, or whose data
    cannot be loaded are left out: the one-by-one path handles (and reports) those.
    """
    from tasks.storage import checkpoint_iterations, latest_valid_checkpoint
    from tasks.training import NetworkOutcome, Progress, failed_outcome, network_seed, stop_reason

    if spec.architecture not in FUSABLE:
        return {}
    members, notes = [], {}
    template = build_model(spec)  # fresh weights are drawn by its init plan instead of building each network
    for series_id in series_ids:
        folder = network_dir(output_dir, series_id)
        iterations = checkpoint_iterations(folder)
        if max(iterations, default=0) >= iteration:
            continue  # done already, maybe with this iteration's checkpoint pruned since
        done, state, problems = latest_valid_checkpoint(folder, below=iteration + 1, iterations=iterations)
        if done != iteration - 1 or (state is not None and state["spec"] != spec.fingerprint()):
            continue
        if state is not None:
            journal_recovered_done(folder, done)
        progress = Progress.from_metrics(state["metrics"] if state else None, spec, done)
        if progress.stopped:
            continue  # stopped early: the one-by-one path reports it without training
        try:
            members.append(prepare_member(series_id, spec, state, output_dir, network_seed(spec.seed, series_id),
                                          iteration, template, progress))
            members[-1].checkpoints = iterations
            notes[series_id] = problems
        except Exception:
            continue
    if not members:
        return {}
    outcomes = {}
    progress = {m.series_id: m.progress for m in members}
    members.sort(key=lambda m: -m.windows.x_train.shape[0])
    trained: dict = {}
    width = fused_width(spec.architecture, device) or len(members)
    with CheckpointWriters() as writers:
        # Journaled by a writer thread while the first group trains: creating 1660 journal files
        # took 1.2 s of the training thread here. Checkpoint writes wait for it (start before done).
        writers.first(lambda: [journal_event(network_dir(output_dir, m.series_id), "start", iteration, worker)
                               for m in members])  # fmt: skip
        for start in range(0, len(members), width):
            group = members[start : start + width]
            trained.update(train_fused_iteration(group, spec, iteration, output_dir, device, worker, template, writers))
    for series_id, result in trained.items():
        if isinstance(result, Exception):
            outcomes[series_id] = failed_outcome(series_id, output_dir, iteration - 1,
                                                 f"{type(result).__name__}: {result}", notes=notes[series_id])  # fmt: skip
        else:
            train_loss, val_loss, windows, seconds = result
            stopped = progress[series_id].stopped
            outcomes[series_id] = NetworkOutcome(
                series_id, "stopped" if stopped else "trained", iteration, train_loss, val_loss, windows, seconds,
                str(checkpoint_path(network_dir(output_dir, series_id), iteration)), notes=notes[series_id],
                error=stop_reason(spec, progress[series_id]) if stopped else None,
            )  # fmt: skip
    return outcomes
