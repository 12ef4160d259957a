"""Run one chain of iteration tasks per shard on Dask, with no barrier between shards."""

from __future__ import annotations

import distributed
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows.cluster import TorchWarmup

from models import ModelSpec
from tasks.prefect_tasks import train_shard_iteration_task
from tasks.shards import ShardPlan
from tasks.training import IterationResult


@flow(name="train-shards", flow_run_name="train-{iterations}-iterations-of-{output_dir}")
def train_shards(
    shards: list[ShardPlan], spec: ModelSpec, iterations: int, output_dir: str, device: str = "cpu"
) -> tuple[list[IterationResult], dict[str, str]]:
    """Train `iterations` iterations of every shard; return each task's result and whole-task failures.

    Iteration k+1 of a shard is submitted the moment iteration k finishes, so a fast shard never
    waits for a slow one. Only networks that trained go on to the next iteration. A task that still
    fails after Prefect's retries ends its shard's chain; the other chains go on.
    """
    logger = get_run_logger()
    # Registered plugins also run on workers that join later, e.g. after a restart.
    FlowRunContext.get().task_runner.client.register_plugin(TorchWarmup())
    in_flight: dict[distributed.Future, tuple[ShardPlan, int, object]] = {}

    def submit(shard: ShardPlan, iteration: int, after=None) -> distributed.Future:
        future = train_shard_iteration_task.submit(
            shard.shard_id, list(shard.series_ids), spec, iteration, output_dir, device,
            wait_for=[after] if after is not None else None,
        )  # fmt: skip
        in_flight[future.wrapped_future] = (shard, iteration, future)
        return future.wrapped_future

    first_wave = [submit(shard, 1) for shard in shards]
    # prefect-dask's client is not Dask's default client, so its loop is named explicitly.
    completions = distributed.as_completed(first_wave, loop=first_wave[0].client.loop)
    total, finished = len(shards) * iterations, 0
    results: list[IterationResult] = []
    failures: dict[str, str] = {}
    for done in completions:
        shard, iteration, future = in_flight.pop(done)
        finished += 1
        future.wait()  # already done in Dask; this settles the final state without asking the API
        state = future.state
        if not state.is_completed():
            message = f"task shard-{shard.shard_id}-iter-{iteration} failed after retries: {state.message}"
            logger.error(message)
            failures.update({series_id: message for series_id in shard.series_ids})
            continue
        result: IterationResult = state.result()
        results.append(result)
        still_training = tuple(n.series_id for n in result.networks if n.status == "trained")
        logger.info(
            "shard %d iteration %d: %d trained, %d failed in %.2fs (%d/%d tasks)",
            shard.shard_id, iteration, len(still_training), len(result.networks) - len(still_training),
            result.wall_seconds, finished, total,
        )  # fmt: skip
        if iteration < iterations and still_training:
            completions.add(submit(ShardPlan(shard.shard_id, still_training), iteration + 1, after=future))
    return results, failures
