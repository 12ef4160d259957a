"""`train_many`: one network per series, trained in chains of iteration tasks on a Dask cluster."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from data import BUNDLED_SERIES
from flows.cluster import check_scheduler, make_task_runner, workers_report_to_this_api
from flows.shard_chains import train_shards
from models import ModelSpec
from tasks.prefect_tasks import stage_series_task, validate_series_task
from tasks.results import results_table, status_counts, tasks_table, write_parquet
from tasks.series import load_table
from tasks.shards import plan_fixed_shards
from tasks.storage import claim_run_dir

DEFAULT_OUTPUT_DIR = "runs/train_many"


def _check_parameters(iterations: int, device: str) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (blocks of epochs per network); got {iterations!r}")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


@flow(name="train-many")
def train_many(
    data: str | Path | pd.DataFrame = str(BUNDLED_SERIES),
    model: ModelSpec | None = None,
    iterations: int = 2,
    shard_size: int = 32,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    cluster_address: str | None = None,
    n_workers: int | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Train one network per series of a long table (series_id, timestamp, value).

    `data` is a parquet/CSV path or a DataFrame; `model` a ModelSpec (or a dict of its fields, or
    an architecture name). Each shard of `shard_size` networks is trained as a chain of
    `iterations` retryable tasks on a LocalCluster of `n_workers` processes, or on the scheduler at
    `cluster_address`. Re-running with the same `output_dir` resumes and redoes nothing finished.
    Returns one row per network and writes it to `output_dir/results.parquet`.
    """
    logger = get_run_logger()
    spec = ModelSpec.coerce(model)
    _check_parameters(iterations, device)
    plan_fixed_shards([], shard_size)  # rejects a bad shard_size before any work
    table = load_table(data)
    out = Path(output_dir).resolve()
    if cluster_address:
        workers = check_scheduler(cluster_address)
        logger.info("Dask scheduler at %s has %d worker(s)", cluster_address, workers)
    claim_run_dir(out, spec.model_dump(), spec.fingerprint())

    valid, invalid = validate_series_task(table, spec)
    logger.info("%d series to train, %d invalid", len(valid), len(invalid))
    stage_series_task(valid, str(out))
    series_ids = [s.series_id for s in valid]
    shards = plan_fixed_shards(series_ids, shard_size)

    iteration_results, failures = [], {}
    if shards:
        runner = make_task_runner(cluster_address, n_workers)
        with workers_report_to_this_api():
            iteration_results, failures = train_shards.with_options(task_runner=runner)(
                shards, spec, iterations, str(out), device
            )

    results = results_table(series_ids, invalid, iteration_results, failures)
    write_parquet(results, out / "results.parquet")
    write_parquet(tasks_table(iteration_results), out / "tasks.parquet")
    counts = status_counts(results)
    create_table_artifact(
        key="train-many-results",
        table=[{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
               for row in results.astype(object).where(results.notna(), None).to_dict("records")],
        description=f"One row per network: {counts}. Full table: {out / 'results.parquet'}",
    )  # fmt: skip
    logger.info("networks by status: %s; results in %s", counts, out / "results.parquet")
    return results
