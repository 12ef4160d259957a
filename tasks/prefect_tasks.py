"""The Prefect tasks: thin wrappers that give the plain functions names, retries and logging.

Idempotence comes from the checkpoints, not from Prefect's cache, so caching is off: a retried or
re-run task looks at the checkpoints on disk and skips what is already done.
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from models import ModelSpec
from tasks.calibration import calibrate
from tasks.fused import fused_widths
from tasks.series import InvalidSeries, SeriesData, validate_table
from tasks.storage import stage_values
from tasks.training import IterationResult, train_shard_iteration


@task(name="validate-series", cache_policy=NONE, persist_result=False)
def validate_series_task(table: pd.DataFrame, spec: ModelSpec) -> tuple[list[SeriesData], list[InvalidSeries]]:
    """Split a long table into trainable series and rejected ones (with reasons)."""
    return validate_table(table, spec)


@task(name="stage-series", cache_policy=NONE, persist_result=False)
def stage_series_task(series: list[SeriesData], output_dir: str) -> int:
    """Write each valid series where the iteration tasks read it; return how many."""
    for item in series:
        stage_values(output_dir, item.series_id, item.values)
    return len(series)


@task(
    name="train-shard-iteration",
    task_run_name="shard-{shard_id}-iter-{iteration}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    retry_jitter_factor=0.5,
    cache_policy=NONE,
    persist_result=False,
)
def train_shard_iteration_task(
    shard_id: int, series_ids: list[str], spec: ModelSpec, iteration: int, output_dir: str, device: str = "cpu",
    strategy: str = "one_by_one",
) -> IterationResult:  # fmt: skip
    """One iteration of one shard; see tasks.training.train_shard_iteration."""
    result = train_shard_iteration(shard_id, series_ids, spec, iteration, output_dir, device, strategy=strategy)
    result.dask_priority = dask_priority_here()
    return result


def dask_priority_here() -> int | None:
    """The user priority the Dask worker runs the current task under, or None outside Dask.

    Read back from the worker rather than trusted from the submit call: this is what proves the
    cost model's priorities reached the scheduler through Prefect.
    """
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        state = get_worker().state.tasks.get(thread_state.key)
    except (ImportError, ValueError, AttributeError):
        return None
    # Dask stores (-user priority, submission order, ...): higher user priorities run first.
    return -int(state.priority[0]) if state is not None and state.priority else None


@task(name="calibrate-cost-model", cache_policy=NONE, persist_result=False, retries=1)
def calibrate_task(spec: ModelSpec, strategy: str, device: str, shortest: int, longest: int) -> list:
    """Time a few tiny real tasks on a worker: the cost model's prior (tasks.calibration)."""
    return calibrate(spec, strategy, device, shortest, longest)


@task(name="fused-group-widths", cache_policy=NONE, persist_result=False, retries=1)
def group_widths_task(architectures: list[str], device: str) -> dict:
    """The fused group width of each architecture on a worker, for the flow's plan (tasks.fused.fused_widths)."""
    return fused_widths(architectures, device)


@task(name="probe-overhead", cache_policy=NONE, persist_result=False)
def probe_task() -> float:
    """Do nothing: its round trip measures what Prefect and Dask add to every task."""
    return time.time()
