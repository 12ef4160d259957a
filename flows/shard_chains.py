"""Run one chain of iteration tasks per shard on Dask, ordered by cost-model priorities."""

from __future__ import annotations

import statistics
import time

import dask
import distributed
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Crashed

from flows.cluster import TorchWarmup
from flows.progress import RunProgress
from models import ModelSpec
from tasks.calibration import prior_from
from tasks.cost_model import CostModel, describe_task, device_kind, effective_strategy, load_history, save_history
from tasks.prefect_tasks import calibrate_task, group_widths_task, probe_task, train_shard_iteration_task
from tasks.shards import (
    NetworkLoad,
    ShardPlan,
    choose_strategies,
    forecast,
    group_by_spec,
    plan_auto_shards,
    plan_fixed_shards,
    split_shard,
)
from tasks.training import IterationResult

PROBES = 3  # sequential no-op tasks whose median round trip is the per-task overhead prior


def _mark_crashed(task_run_id, message: str) -> None:
    """Show a task whose Dask execution was lost as Crashed in the UI (it would stay Running)."""
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception:  # UI bookkeeping only: never fail the run over it
        pass


def _cluster_threads(client: distributed.Client) -> int:
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return max(1, sum(w.get("nthreads", 1) for w in workers))


def _measure_overhead() -> float:
    """Median round trip of a no-op task through Prefect and Dask, in seconds."""
    trips = []
    for _ in range(PROBES):
        sent = time.time()
        probe_task.submit().result()
        trips.append(time.time() - sent)
    return statistics.median(trips)


def _cost_model(
    loads: list[NetworkLoad], strategies: tuple[str, ...], device: str, output_dir: str, logger
) -> CostModel:  # fmt: skip
    """The run's cost model: fitted on this output dir's history, calibrated on a worker where it has none.

    Every (architecture, strategy) the run may use is covered: both strategies when it is to
    choose between them. Calibrations run as parallel tasks.
    """
    history = load_history(output_dir)
    model = CostModel.from_history(history) if history is not None and len(history) else CostModel()
    pending = {}
    for spec, members in group_by_spec(loads).items():
        windows = [m.train_windows for m in members]
        for strategy in strategies:
            key = (spec.architecture, effective_strategy(spec, strategy), device_kind(device))
            if model.knows(key) or key in pending:
                continue
            pending[key] = calibrate_task.submit(spec, key[1], device, min(windows), max(windows))
    for key, future in pending.items():
        observations = future.result()
        model.prior.update(prior_from(observations))
        logger.info("cost model for %s calibrated on a worker: %d tiny tasks, %.2fs", key, len(observations),
                    sum(s for _, s in observations))  # fmt: skip
    return model


def _fused_group_widths(loads: list[NetworkLoad], strategies: tuple[str, ...], device: str, logger) -> dict:
    """(architecture, device kind) -> the fused group width a worker uses, for every architecture that may fuse.

    Asked of a worker, not computed here: the LSTM/GRU width depends on whether that machine has
    the compiled layer, and computing it here would build the layer on the flow's machine.
    """
    fusable = sorted({spec.architecture for spec in group_by_spec(loads)
                      if any(effective_strategy(spec, s) == "fused" for s in strategies)})  # fmt: skip
    if not fusable:
        return {}
    try:
        reported = group_widths_task.submit(fusable, device).result()
    except Exception as exc:  # only the plan's step counts depend on it: plan with this process's widths
        logger.warning("could not ask a worker for its fused group widths (%s); planning with this machine's", exc)
        return {}
    logger.info("fused group widths on the workers: %s", reported)
    return {(architecture, device_kind(device)): width for architecture, width in reported.items()}


@flow(name="train-shards", flow_run_name="train-{iterations}-iterations-of-{output_dir}")
def train_shards(
    train_windows: dict[str, int], spec: ModelSpec, iterations: int, output_dir: str, device: str = "cpu",
    progress_bar: bool = True, strategy: str = "auto", shard_size: int | str = "auto",
    priorities: bool = True, architectures: dict[str, str] | None = None,
) -> tuple[list[IterationResult], dict[str, str], dict]:  # fmt: skip
    """Train `iterations` iterations of every network; return task results, failures and the plan.

    `train_windows` maps each series to its count of training windows (what its tasks cost);
    `architectures` optionally gives a series an architecture other than `spec`'s. Shards are
    planned from the cost model (`shard_size="auto"`) or cut at a fixed size. Iteration k+1 of a
    shard is submitted the moment iteration k finishes, with the Dask priority of its predicted
    remaining chain (longest first) when `priorities` is on, recomputed from the refitted model at
    each submission, so a fast shard never waits for a slow one and only networks that trained go
    on. A shard that runs out of memory, or whose task Dask gives up on (KilledWorker), is halved
    and the halves retried at the same iteration. A task that still fails after Prefect's retries
    ends its shard's chain; the other chains go on. `strategy="auto"` picks fused or one-by-one
    per architecture by the cost model's predicted makespan of each (tasks.shards.choose_strategies).
    """
    logger = get_run_logger()
    client = FlowRunContext.get().task_runner.client
    logger.info("Dask dashboard: %s", client.dashboard_link)
    # Registered plugins also run on workers that join later, e.g. after a restart.
    architectures = architectures or {}
    client.register_plugin(TorchWarmup.for_run(spec.architecture, architectures, device))
    specs = {a: spec.model_copy(update={"architecture": a}) for a in set(architectures.values())}
    loads = {sid: NetworkLoad(sid, specs.get(architectures.get(sid), spec), rows) for sid, rows in train_windows.items()}
    workers = _cluster_threads(client)
    planned = shard_size == "auto"
    choosing = strategy == "auto"
    uses_model = planned or priorities or choosing
    candidates = ("one_by_one", "fused") if choosing else (strategy,)
    model = _cost_model(list(loads.values()), candidates, device, output_dir, logger) if uses_model else CostModel()
    model.widths.update(_fused_group_widths(list(loads.values()), candidates, device, logger))
    # The measured per-task overhead (0.7 s of probes) decides shard sizes and strategy choices; with
    # fixed shards and one strategy it would only add the same ~0.1 s per remaining task to priorities.
    overhead = _measure_overhead() if planned or choosing else 0.0
    choices = {}
    if choosing:
        choices = choose_strategies(list(loads.values()), iterations, workers, model, overhead, device)
        strategy = {architecture: choice["strategy"] for architecture, choice in choices.items()}
        for architecture, choice in choices.items():
            logger.info("strategy for %s: %s (predicted makespan %s)", architecture, choice["strategy"],
                        ", ".join(f"{k} {v:.1f}s" for k, v in choice["predicted_makespan"].items()))  # fmt: skip
    if planned:
        shards, summary = plan_auto_shards(list(loads.values()), iterations, workers, model, overhead, strategy, device)
        logger.info("planned %d shards for %d workers: predicted makespan %.1fs (lower bound %.1fs), "
                    "Prefect+Dask overhead %.0f ms a task, %.1f%% of the work", summary.shards, workers,
                    summary.predicted_makespan, summary.lower_bound, overhead * 1000,
                    100 * summary.overhead_share)  # fmt: skip
    else:
        shards = []
        for group_spec, members in group_by_spec(list(loads.values())).items():
            shards += plan_fixed_shards([m.series_id for m in members], shard_size, group_spec, len(shards))
    plan = {"workers": workers, "shards": len(shards), "planned": planned, "priorities": priorities,
            "probe_overhead_seconds": overhead,
            "predicted_makespan": summary.predicted_makespan if planned else None,
            "strategies": {s.architecture: effective_strategy(s, strategy) for s in group_by_spec(list(loads.values()))},
            "strategy_predictions": {a: c["predicted_makespan"] for a, c in choices.items()},
            "fused_group_widths": {a: w for (a, _), w in model.widths.items()}}  # fmt: skip

    progress = RunProgress(len(loads), iterations, show_bar=progress_bar)
    in_flight: dict[distributed.Future, tuple[ShardPlan, int, object, dict]] = {}
    next_shard_id = max((s.shard_id for s in shards), default=-1) + 1

    def submit(shard: ShardPlan, iteration: int, after=None) -> distributed.Future:
        members = [loads[sid] for sid in shard.series_ids]
        predicted, priority = forecast(members, iteration, iterations, model, overhead, strategy, device)
        annotations = {"priority": priority} if priorities and priority is not None else {}
        if device.startswith("cuda"):
            annotations["resources"] = {"GPU": 1}  # only workers that declare a GPU take CUDA work
        shard_spec = shard.spec or spec
        with dask.annotate(**annotations):
            future = train_shard_iteration_task.submit(
                shard.shard_id, list(shard.series_ids), shard_spec, iteration, output_dir, device,
                effective_strategy(shard_spec, strategy),
                wait_for=[after] if after is not None else None,
            )  # fmt: skip
        asked = {"submitted": time.time(), "predicted_seconds": predicted,
                 "priority": annotations.get("priority")}  # fmt: skip
        in_flight[future.wrapped_future] = (shard, iteration, future, asked)
        return future.wrapped_future

    def halve(shard: ShardPlan, series_ids: tuple[str, ...], iteration: int, why: str) -> None:
        nonlocal next_shard_id
        halves = split_shard(series_ids, next_shard_id, shard.spec)
        next_shard_id += len(halves)
        logger.warning("%s; retrying its %d network(s) as shards %s", why, len(series_ids),
                       [h.shard_id for h in halves])  # fmt: skip
        for half in halves:
            completions.add(submit(half, iteration))

    if priorities:
        # Idle workers take the first tasks as they arrive, before the rest of the wave is queued
        # by priority: so the wave itself goes out longest predicted chain first.
        shards.sort(key=lambda s: -(forecast([loads[i] for i in s.series_ids], 1, iterations, model, overhead,
                                             strategy, device)[1] or 0))  # fmt: skip
    first_wave = [submit(shard, 1) for shard in shards]
    # prefect-dask's client is not Dask's default client, so its loop is named explicitly.
    completions = distributed.as_completed(first_wave, loop=client.loop)
    results: list[IterationResult] = []
    failures: dict[str, str] = {}
    for done in completions:
        shard, iteration, future, asked = in_flight.pop(done)
        name = f"shard-{shard.shard_id}-iter-{iteration}"
        if done.status == "error":
            error = done.exception()
            message = f"task {name} was lost by Dask ({type(error).__name__}: {error})"
            _mark_crashed(future.task_run_id, message)
            if len(shard.series_ids) > 1:
                halve(shard, shard.series_ids, iteration, message)
            else:
                failures[shard.series_ids[0]] = message
                progress.advance(iteration, trained=0, given_up=1)
            continue
        future.wait()  # already done in Dask; this settles the final state without asking the API
        state = future.state
        if not state.is_completed():
            message = f"task {name} failed after retries: {state.message}"
            logger.error(message)
            failures.update({series_id: message for series_id in shard.series_ids})
            progress.advance(iteration, trained=0, given_up=len(shard.series_ids))
            continue
        result: IterationResult = state.result()
        for attribute, value in asked.items():
            setattr(result, attribute, value)
        results.append(result)
        if result.networks and not any(n.skipped for n in result.networks) and not result.out_of_memory:
            rows = [loads[n.series_id].rows(iteration) for n in result.networks]
            model.observe(describe_task(rows, loads[shard.series_ids[0]].spec, strategy, device, model.widths),
                          result.wall_seconds)  # fmt: skip
        for outcome in result.networks:
            for note in outcome.notes:
                logger.warning("network %r: %s", outcome.series_id, note)
        still_training = tuple(n.series_id for n in result.networks if n.status == "trained")
        stopped = sum(n.status == "stopped" for n in result.networks)
        logger.info("%s: %d trained, %d stopped early, %d failed in %.2fs (predicted %s)", name, len(still_training),
                    stopped, len(result.networks) - len(still_training) - stopped, result.wall_seconds,
                    "-" if asked["predicted_seconds"] is None else f"{asked['predicted_seconds']:.2f}s")  # fmt: skip
        given_up = len(result.networks) - len(still_training)  # failed or stopped early: no more iterations
        if result.out_of_memory:
            reported = {n.series_id for n in result.networks}
            rest = tuple(s for s in shard.series_ids if s not in reported)
            if len(shard.series_ids) > 1:
                halve(shard, rest, iteration, f"{name} ran out of memory ({result.out_of_memory})")
            else:
                failures[shard.series_ids[0]] = f"out of memory even alone: {result.out_of_memory}"
                given_up += 1
        progress.advance(iteration, trained=len(still_training), given_up=given_up)
        if iteration < iterations and still_training:
            next_shard = ShardPlan(shard.shard_id, still_training, shard.spec)
            completions.add(submit(next_shard, iteration + 1, after=future))
    progress.close()
    save_history(output_dir, model)
    return results, failures, plan
