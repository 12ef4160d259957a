"""Run one chain of iteration tasks per shard on Dask, with no barrier between shards."""

from __future__ import annotations

import distributed
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Crashed

from flows.cluster import TorchWarmup
from flows.progress import RunProgress
from models import ModelSpec
from tasks.prefect_tasks import train_shard_iteration_task
from tasks.shards import ShardPlan, split_shard
from tasks.training import IterationResult


def _mark_crashed(task_run_id, message: str) -> None:
    """Show a task whose Dask execution was lost as Crashed in the UI (it would stay Running)."""
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception:  # UI bookkeeping only: never fail the run over it
        pass


@flow(name="train-shards", flow_run_name="train-{iterations}-iterations-of-{output_dir}")
def train_shards(
    shards: list[ShardPlan], spec: ModelSpec, iterations: int, output_dir: str, device: str = "cpu",
    progress_bar: bool = True, strategy: str = "one_by_one",
) -> tuple[list[IterationResult], dict[str, str]]:  # fmt: skip
    """Train `iterations` iterations of every shard; return each task's result and per-network failures.

    Iteration k+1 of a shard is submitted the moment iteration k finishes, so a fast shard never
    waits for a slow one, and only networks that trained go on. A shard that runs out of memory,
    or whose task Dask gives up on after its workers died under it (KilledWorker), is halved and
    the halves retried at the same iteration. A task that still fails after Prefect's retries ends
    its shard's chain; the other chains go on.
    """
    logger = get_run_logger()
    client = FlowRunContext.get().task_runner.client
    logger.info("Dask dashboard: %s", client.dashboard_link)
    # Registered plugins also run on workers that join later, e.g. after a restart.
    client.register_plugin(TorchWarmup())
    progress = RunProgress(sum(len(s.series_ids) for s in shards), iterations, show_bar=progress_bar)
    in_flight: dict[distributed.Future, tuple[ShardPlan, int, object]] = {}
    next_shard_id = max(s.shard_id for s in shards) + 1

    def submit(shard: ShardPlan, iteration: int, after=None) -> distributed.Future:
        future = train_shard_iteration_task.submit(
            shard.shard_id, list(shard.series_ids), spec, iteration, output_dir, device, strategy,
            wait_for=[after] if after is not None else None,
        )  # fmt: skip
        in_flight[future.wrapped_future] = (shard, iteration, future)
        return future.wrapped_future

    def halve(series_ids: tuple[str, ...], iteration: int, why: str) -> None:
        nonlocal next_shard_id
        halves = split_shard(series_ids, next_shard_id)
        next_shard_id += len(halves)
        logger.warning("%s; retrying its %d network(s) as shards %s", why, len(series_ids),
                       [h.shard_id for h in halves])  # fmt: skip
        for half in halves:
            completions.add(submit(half, iteration))

    first_wave = [submit(shard, 1) for shard in shards]
    # prefect-dask's client is not Dask's default client, so its loop is named explicitly.
    completions = distributed.as_completed(first_wave, loop=first_wave[0].client.loop)
    results: list[IterationResult] = []
    failures: dict[str, str] = {}
    for done in completions:
        shard, iteration, future = in_flight.pop(done)
        name = f"shard-{shard.shard_id}-iter-{iteration}"
        if done.status == "error":
            error = done.exception()
            message = f"task {name} was lost by Dask ({type(error).__name__}: {error})"
            _mark_crashed(future.task_run_id, message)
            if len(shard.series_ids) > 1:
                halve(shard.series_ids, iteration, message)
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
        results.append(result)
        for outcome in result.networks:
            for note in outcome.notes:
                logger.warning("network %r: %s", outcome.series_id, note)
        still_training = tuple(n.series_id for n in result.networks if n.status == "trained")
        logger.info("%s: %d trained, %d failed in %.2fs", name, len(still_training),
                    len(result.networks) - len(still_training), result.wall_seconds)  # fmt: skip
        given_up = len(result.networks) - len(still_training)
        if result.out_of_memory:
            reported = {n.series_id for n in result.networks}
            rest = tuple(s for s in shard.series_ids if s not in reported)
            if len(shard.series_ids) > 1:
                halve(rest, iteration, f"{name} ran out of memory ({result.out_of_memory})")
            else:
                failures[shard.series_ids[0]] = f"out of memory even alone: {result.out_of_memory}"
                given_up += 1
        progress.advance(iteration, trained=len(still_training), given_up=given_up)
        if iteration < iterations and still_training:
            completions.add(submit(ShardPlan(shard.shard_id, still_training), iteration + 1, after=future))
    progress.close()
    return results, failures
