"""Fused vs one-by-one vs a plain loop: seconds to train N networks one iteration, per architecture (issue #5).

Three ways, in one process and one thread, on the first N bundled series (default spec: 32 wide,
2 layers, window 32, horizon 8, batch 128; 5 epochs for the MLP, 1 for the slower architectures):
  - plain loop: what a user writes (a fresh model + Adam per series, shuffled mini-batches,
    evaluation), no checkpoints;
  - engine one-by-one: tasks.training.train_shard_iteration(strategy="one_by_one"), checkpoints included;
  - engine fused: the same with strategy="fused" (all N networks in one shard), checkpoints included.
With --short, instead: the short-series fleet (3000 series of 20-150 points, window 8, horizon 2),
timed end to end: `train_many` from call to results (Prefect, a LocalCluster of 2 workers, staging,
checkpoints and reports included; strategy fused) against the plain loop, at 10 and 100 epochs.
Prefect's temporary API server, which only the first flow call of a process without PREFECT_API_URL
starts, is started and timed first, and both speedups are reported: with it running (as under
`make serve` or a deployment) and with its start added to the call.
With --every-core, also the whole machine, which is what a user runs against what manynets runs:
the plain loop at PyTorch's default thread count against the engine on one single-threaded Dask
worker per core, one shard each, with the strategy this run measured faster on one thread.
The engine runs with the malloc settings its Dask workers get (tasks.allocator).
Achieved FLOP/s counts 3 x the forward multiply-adds x 2 per training sample (forward + backward)
and is set against the peak of a float32 batched matmul measured in the same run. The multiply-adds
are the model's, as the loop computes them (tasks.cost_model.macs_per_window): the stacked Transformer
skips some (its last layer runs for the last position only), so its figure is work done per second in
the loop's terms, not arithmetic the engine ran.
Prints a table and writes benchmarks/results/fused_vs_loop.json (or fused_short_series.json).
With --repeats R, each one-thread way is timed R times, interleaved, and the fastest kept.
With --device cuda, the loop and the engine both train on the GPU (benchmarks/gpu_check.sh runs it).
With --fused-widths W..., the fused engine is also timed with its groups W wide (the speedup of each
is in the JSON and printed), so a width is chosen against the loop of the same run.
Run: `python -m benchmarks.fused_vs_loop [--architectures mlp lstm gru transformer] [--sizes 64 256 1660]
[--epochs 5] [--other-epochs 1] [--every-core] [--skip-one-by-one] [--repeats 1] [--device cpu] [--short]
[--fused-widths W ...]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import tasks.fused
from data import BUNDLED_SERIES
from models import ModelSpec
from models.forecasters import GRUForecaster, LSTMForecaster, TransformerForecaster
from models.stacked import peak_flops
from tasks.allocator import keep_freed_memory
from tasks.cost_model import macs_per_window
from tasks.series import load_table, make_windows, validate_table
from tasks.storage import stage_values
from tasks.training import train_shard_iteration, warm_up

RESULTS = Path(__file__).with_name("results")


def user_model(spec: ModelSpec) -> nn.Module:
    """The model a user would write for `spec`, built with PyTorch's default initialisation."""
    if spec.architecture == "mlp":
        return nn.Sequential(nn.Linear(spec.window, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, spec.hidden),
                             nn.ReLU(), nn.Linear(spec.hidden, spec.horizon))  # fmt: skip
    # The same modules a user would write (nn.LSTM / nn.GRU / nn.TransformerEncoder plus a head).
    return {"lstm": LSTMForecaster, "gru": GRUForecaster, "transformer": TransformerForecaster}[spec.architecture](spec)


def plain_loop(series, spec: ModelSpec, device: str = "cpu") -> float:
    """The user's loop: one fresh model and optimizer per series, trained and evaluated in turn.

    On a GPU as a user would move it there: each series' windows and its model once, batches
    drawn on the device; the validation loss's .item() waits for the device every series.
    """
    started = time.perf_counter()
    for item in series:
        w = make_windows(item.values, spec)
        x, y = torch.tensor(w.x_train, device=device), torch.tensor(w.y_train, device=device)
        model = user_model(spec).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
        for _ in range(spec.epochs_per_iteration):
            order = torch.randperm(len(x), device=device)
            for start in range(0, len(x), spec.batch_size):
                idx = order[start : start + spec.batch_size]
                loss = F.mse_loss(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            F.mse_loss(model(torch.tensor(w.x_val, device=device)), torch.tensor(w.y_val, device=device)).item()
    return time.perf_counter() - started


def engine(series, spec: ModelSpec, strategy: str, device: str = "cpu", width: int | None = None) -> float:
    """train_shard_iteration over all the series as one shard, staged data and checkpoints included.

    `width` replaces the fused groups' width (tasks.fused.fused_width) for this call."""
    with tempfile.TemporaryDirectory(prefix="manynets-fused-") as scratch, contextlib.ExitStack() as patches:
        for item in series:
            stage_values(scratch, item.series_id, item.values)
        if width is not None:
            patches.enter_context(mock.patch.object(tasks.fused, "fused_width", lambda architecture, device: width))
        started = time.perf_counter()
        result = train_shard_iteration(0, [s.series_id for s in series], spec, 1, scratch, device, strategy=strategy)
        seconds = time.perf_counter() - started  # every checkpoint is on the host: the device is done
    assert all(n.status == "trained" for n in result.networks), [n.error for n in result.networks if n.error]
    return seconds


def engine_on_every_core(series, spec: ModelSpec, workers: int, strategy: str) -> float:
    """The engine on every core: one single-threaded Dask worker per core (as train_many's local
    cluster, its warm-up plugin included), one shard each. Timed from submitting to all checkpoints
    written; the cluster's start and PyTorch's warm-up on each worker (train_many pays them once
    per run) are not included."""
    import distributed

    from flows.cluster import TorchWarmup

    ids = [s.series_id for s in series]
    with tempfile.TemporaryDirectory(prefix="manynets-cores-") as scratch, distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:  # fmt: skip
        client.register_plugin(TorchWarmup((spec.architecture,)))
        for item in series:
            stage_values(scratch, item.series_id, item.values)
        started = time.perf_counter()
        futures = [client.submit(train_shard_iteration, w, ids[w::workers], spec, 1, scratch, strategy=strategy,
                                 pure=False) for w in range(workers)]  # fmt: skip
        results = client.gather(futures)
        seconds = time.perf_counter() - started
    assert sum(n.status == "trained" for r in results for n in r.networks) == len(ids)
    return seconds


def start_prefect_api() -> float:
    """Seconds to start Prefect's temporary API server, as the first flow call of a process would.

    Started here, the same server (a per-process singleton) serves every later flow call, so each
    train_many below is timed alike; a process with PREFECT_API_URL set pays nothing.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return 0.0
    started = time.perf_counter()
    SubprocessASGIServer().start()
    return time.perf_counter() - started


def short_series(epoch_counts: list[int], n_series: int, shard_size: int) -> None:
    """The short-series fleet end to end: train_many (fused) against the plain loop."""
    from data.generate import generate_table
    from flows.train import train_many

    table = generate_table(n_series, min_length=20, max_length=150, seed=7)
    server_seconds = start_prefect_api()
    print(f"Prefect temporary API server started in {server_seconds:.1f} s", flush=True)
    rows = []
    for epochs in epoch_counts:
        spec = ModelSpec(window=8, horizon=2, epochs_per_iteration=epochs)
        valid, _ = validate_table(table, spec)
        with tempfile.TemporaryDirectory(prefix="manynets-short-") as scratch:
            started = time.perf_counter()
            results = train_many(table, model=spec, iterations=1, shard_size=shard_size, output_dir=scratch,
                                 n_workers=2, strategy="fused", progress_bar=False)  # fmt: skip
            flow_seconds = time.perf_counter() - started
        assert (results["status"] == "trained").sum() == len(valid)
        torch.set_num_threads(1)
        loop_seconds = plain_loop(valid, spec)
        torch.set_num_threads(torch.get_num_interop_threads())
        rows.append({"series": n_series, "valid": len(valid), "epochs": epochs, "shard_size": shard_size,
                     "plain_loop_s": loop_seconds, "train_many_fused_s": flow_seconds,
                     "speedup": loop_seconds / flow_seconds, "prefect_server_start_s": server_seconds,
                     "speedup_with_server_start": loop_seconds / (flow_seconds + server_seconds)})  # fmt: skip
        print(rows[-1], flush=True)
    view = Table(title=f"{n_series} short series (20-150 points), MLP, end to end")
    for column in ("epochs", "networks", "plain loop s", "train_many fused s", "speedup",
                   f"speedup if the call also starts Prefect's server ({server_seconds:.1f} s)"):  # fmt: skip
        view.add_column(column, justify="right")
    for r in rows:
        view.add_row(str(r["epochs"]), str(r["valid"]), f"{r['plain_loop_s']:.1f}", f"{r['train_many_fused_s']:.1f}",
                     f"{r['speedup']:.2f}x", f"{r['speedup_with_server_start']:.2f}x")  # fmt: skip
    Console(width=160).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_short_series.json").write_text(json.dumps(
        {"benchmark": "fused_short_series", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))
    print(f"wrote {RESULTS / 'fused_short_series.json'}")


def _maybe(value, form: str) -> str:
    return "-" if value is None else form.format(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=["mlp", "lstm", "gru", "transformer"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1660])
    parser.add_argument("--epochs", type=int, default=5, help="epochs for the MLP")
    parser.add_argument("--other-epochs", type=int, default=1, help="epochs for LSTM, GRU and transformer")
    parser.add_argument("--short", action="store_true", help="the short-series fleet, end to end")
    parser.add_argument("--short-series", type=int, default=3000)
    parser.add_argument("--short-epochs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shard-size", type=int, default=250, help="with --short: networks per task")
    parser.add_argument("--every-core", action="store_true",
                        help="also: the plain loop at PyTorch's default threads vs the engine on one worker per core")  # fmt: skip
    parser.add_argument("--skip-one-by-one", action="store_true",
                        help="leave out the one-thread engine one-by-one (it is the loop plus checkpoints); "
                             "--every-core then runs the engine fused")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each one-thread way this many times, interleaved, and keep the fastest")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: the loop and the engine both there")
    parser.add_argument("--fused-widths", type=int, nargs="+", default=[],
                        help="also time the fused engine with its groups this wide, in the same run (the table's "
                             "fused column keeps the engine's own width)")  # fmt: skip
    parser.add_argument("--output", default="fused_vs_loop.json", help="file name under benchmarks/results")
    args = parser.parse_args(argv)
    device = args.device
    if device != "cpu" and args.every_core:
        parser.error("--every-core compares CPU workers with the CPU loop; leave it out with --device " + device)
    if args.short:
        short_series(args.short_epochs, args.short_series, args.shard_size)
        return
    default_threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    torch.set_num_threads(1)  # as on a Dask worker: parallelism comes from workers, not threads
    # As the worker plugin does. The plain loop is indifferent to it (measured here: 128 MLPs in
    # 7.1-7.9 s before, 7.5-8.2 s after; 16 GRUs 3.9-4.8 s and 4.2-5.3 s).
    keep_freed_memory()
    table = load_table(BUNDLED_SERIES)
    warm_up(device)
    peak = peak_flops(device)
    where = "1 thread" if device == "cpu" else device
    print(f"float32 bmm peak, {where}: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for architecture in args.architectures:
        epochs = args.epochs if architecture == "mlp" else args.other_epochs
        spec = ModelSpec(architecture=architecture, epochs_per_iteration=epochs)
        valid, _ = validate_table(table, spec)
        for n in args.sizes:
            series = valid[:n]
            samples = sum(len(make_windows(s.values, spec).x_train) for s in series) * epochs
            flop = 3 * 2 * macs_per_window(spec) * samples
            # Interleaved, so a slow spell of this shared machine falls on every way alike; the fastest of
            # each is kept (the least disturbed), every timing is recorded.
            timings: dict[str, list[float]] = {"plain_loop": [], "one_by_one": [], "fused": []}
            for _ in range(args.repeats):
                timings["plain_loop"].append(plain_loop(series, spec, device))
                if not args.skip_one_by_one:
                    timings["one_by_one"].append(engine(series, spec, "one_by_one", device))
                timings["fused"].append(engine(series, spec, "fused", device))
                for width in args.fused_widths:
                    timings.setdefault(f"fused_width_{width}", []).append(engine(series, spec, "fused", device, width))
            loop, fused = min(timings["plain_loop"]), min(timings["fused"])
            one_by_one = min(timings["one_by_one"]) if timings["one_by_one"] else None
            machine = {}
            if args.every_core:
                # The strategy this run measured faster on one thread, as strategy="auto" would choose.
                strategy = "fused" if one_by_one is None or fused <= one_by_one else "one_by_one"
                torch.set_num_threads(default_threads)
                machine["plain_loop_default_threads_s"] = plain_loop(series, spec)
                torch.set_num_threads(1)
                machine["every_core_strategy"] = strategy
                machine["engine_every_core_s"] = engine_on_every_core(series, spec, cores, strategy)
                machine["every_core_speedup"] = machine["plain_loop_default_threads_s"] / machine["engine_every_core_s"]
            rows.append({**machine, "architecture": architecture, "epochs": epochs, "networks": n, "samples": samples,
                         "repeats": args.repeats, "timings_s": timings,
                         "plain_loop_s": loop, "one_by_one_s": one_by_one, "fused_s": fused,
                         "fused_samples_per_s": samples / fused, "fused_speedup_vs_loop": loop / fused,
                         "one_by_one_speedup_vs_loop": None if one_by_one is None else loop / one_by_one,
                         "fused_gflops": flop / fused / 1e9, "loop_gflops": flop / loop / 1e9,
                         "fused_share_of_peak": flop / fused / peak,
                         "fused_speedup_by_width": {w: loop / min(timings[f"fused_width_{w}"])
                                                    for w in args.fused_widths}})  # fmt: skip
            print(rows[-1], flush=True)
    fastest = f", fastest of {args.repeats} interleaved" if args.repeats > 1 else ""
    view = Table(title=f"One iteration of N networks, {where}{fastest}: seconds, throughput, speedup over the "
                       "plain loop")  # fmt: skip
    for column in ("arch", "epochs", "networks", "samples", "plain loop s", "one-by-one s", "fused s",
                   "fused samples/s", "fused vs loop", "one-by-one vs loop", "fused GFLOP/s", "of bmm peak"):  # fmt: skip
        view.add_column(column, justify="right")
    for r in rows:
        view.add_row(r["architecture"], str(r["epochs"]), str(r["networks"]), str(r["samples"]),
                     f"{r['plain_loop_s']:.1f}", _maybe(r["one_by_one_s"], "{:.1f}"), f"{r['fused_s']:.1f}",
                     f"{r['fused_samples_per_s']:.0f}", f"{r['fused_speedup_vs_loop']:.2f}x",
                     _maybe(r["one_by_one_speedup_vs_loop"], "{:.2f}x"), f"{r['fused_gflops']:.2f}",
                     f"{100 * r['fused_share_of_peak']:.1f}%")  # fmt: skip
    Console(width=170).print(view)
    if args.every_core:
        view = Table(title=f"The whole machine: the plain loop at PyTorch's default {default_threads} threads vs "
                           f"the engine on {cores} single-threaded workers")  # fmt: skip
        for column in ("arch", "networks", "plain loop s", "engine strategy", "engine, every core s", "speedup"):
            view.add_column(column, justify="right")
        for r in rows:
            view.add_row(r["architecture"], str(r["networks"]), f"{r['plain_loop_default_threads_s']:.1f}",
                         r["every_core_strategy"], f"{r['engine_every_core_s']:.1f}",
                         f"{r['every_core_speedup']:.2f}x")  # fmt: skip
        Console(width=170).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(
        {"benchmark": "fused_vs_loop", "device": device, "peak_bmm_gflops": peak / 1e9, "threads": 1,
         "default_threads": default_threads, "cores": cores, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {RESULTS / args.output}")


if __name__ == "__main__":
    main()
