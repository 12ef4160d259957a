"""`train_many`: one network per series, trained in chains of iteration tasks on a Dask cluster."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from prefect import Flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner
from pydantic import WithJsonSchema

from data import BUNDLED_SERIES
from flows.cluster import (
    LocalClusterInBackground,
    TorchWarmup,
    check_scheduler,
    resolve_device,
    workers_report_to_this_api,
)
from flows.shard_chains import train_shards
from models import ModelSpec
from models.spec import ARCHITECTURES
from tasks.prefect_tasks import stage_series_task, validate_series_task
from tasks.report import summary_markdown, write_plots
from tasks.results import results_table, schedule_summary, status_counts, tasks_table, write_json, write_parquet
from tasks.series import load_table, series_architectures
from tasks.shards import check_shard_size
from tasks.storage import claim_run_dir

DEFAULT_OUTPUT_DIR = "runs/train_many"


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")


def _check_parameters(iterations: int, device: str) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (blocks of epochs per network); got {iterations!r}")
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


# The UI shows `data` as a path; Python callers may also pass a DataFrame.
DataArgument = Annotated[
    str | Path | pd.DataFrame,
    WithJsonSchema({"type": "string", "title": "data", "description": "Parquet or CSV file, long format."}),
]


def _run_name() -> str:
    return f"train-many-{Path(flow_run.parameters.get('output_dir', DEFAULT_OUTPUT_DIR)).name}"


class TableParameterFlow(Flow):
    """A Prefect flow that records DataFrame parameters in the API by their shape.

    Prefect stores each flow run's parameters as JSON; for a DataFrame it tries FastAPI's encoder
    cell by cell, gives up and stores "<DataFrame>" anyway, after 3.4 s for a table of 194k rows
    here (the short-series benchmark's). Paths are stored as they are.
    """

    def serialize_parameters(self, parameters: dict) -> dict:
        frames = {k: v for k, v in parameters.items() if isinstance(v, pd.DataFrame)}
        serialized = super().serialize_parameters({k: v for k, v in parameters.items() if k not in frames})
        serialized.update({k: f"<DataFrame: {len(v)} rows, columns {', '.join(map(str, v.columns))}>"
                           for k, v in frames.items()})  # fmt: skip
        return serialized


def table_flow(**options):
    """@flow(**options), as a TableParameterFlow."""
    return lambda fn: TableParameterFlow(fn, **options)


@table_flow(name="train-many", flow_run_name=_run_name)
def train_many(
    data: DataArgument = str(BUNDLED_SERIES),
    model: ModelSpec = ModelSpec(),
    iterations: int = 2,
    shard_size: int | Literal["auto"] = "auto",
    output_dir: str = DEFAULT_OUTPUT_DIR,
    cluster_address: str | None = None,
    n_workers: int | None = None,
    device: str = "auto",
    progress_bar: bool = True,
    strategy: Literal["auto", "one_by_one", "fused"] = "auto",
    priorities: bool = True,
) -> pd.DataFrame:
    """Train one network per series of a long table (series_id, timestamp, value).

    Each shard of `shard_size` networks is trained as a chain of `iterations` retryable tasks.
    Re-running with the same `output_dir` resumes and redoes nothing already finished. Returns
    one row per network, also written to `output_dir/results.parquet` and published as artifacts.

    Args:
        data: Parquet or CSV file (or, from Python, a DataFrame) with columns series_id, timestamp, value.
        model: The networks' architecture, size, windowing and optimiser settings (from Python, a
            dict of its fields also works).
        iterations: Iterations per network; each is a block of epochs ending in a checkpoint.
        shard_size: Networks trained by one task: 'auto' plans shards from the cost model (balanced,
            several per worker, Prefect+Dask overhead under 10%); 1 means one task per network iteration.
        output_dir: Where checkpoints and results go; the same folder resumes a run.
        cluster_address: Address of an existing Dask scheduler (tcp://host:8786); empty for a local cluster.
        n_workers: Workers of the local cluster; empty for one per core.
        device: 'auto' (CUDA where the cluster has a GPU worker, else CPU), 'cpu', 'cuda' or 'cuda:N'.
        progress_bar: Show a progress bar in the terminal.
        strategy: 'auto' picks, per architecture, whichever of the two the cost model (calibrated on
            a worker, or earlier runs' timings) predicts finishes first; 'fused' trains a shard's
            networks together as one computation; 'one_by_one' trains them one after another.
        priorities: Give each task the Dask priority of its shard's predicted remaining work, so the
            longest chains start first; off, Dask runs tasks in the order they are submitted.

    The data may carry an optional column `architecture` (mlp, lstm, gru or transformer) giving a series an
    architecture other than `model`'s; everything else of `model` applies to all.
    """
    logger = get_run_logger()
    spec = ModelSpec.coerce(model)
    _check_parameters(iterations, device)
    check_shard_size(shard_size)  # rejects a bad shard_size before any work
    _check_flag("priorities", priorities)
    table = load_table(data)
    architectures = series_architectures(table, ARCHITECTURES)
    out = Path(output_dir).resolve()
    if cluster_address:
        workers = check_scheduler(cluster_address)
        logger.info("Dask scheduler at %s has %d worker(s)", cluster_address, workers)
    device = resolve_device(device, cluster_address)
    logger.info("training on %s", device)
    claim_run_dir(out, spec.model_dump(), spec.fingerprint())
    # Started now rather than when the shards are: its workers spawn and warm up while the data is
    # validated and staged.
    local = None
    if not cluster_address:
        local = LocalClusterInBackground(n_workers, device, TorchWarmup.for_run(spec.architecture, architectures, device))
    try:
        return _train_and_report(
            table, spec, architectures, out, iterations, shard_size, cluster_address or local, device, progress_bar,
            strategy, priorities,
        )  # fmt: skip
    finally:
        if local is not None:
            local.close()


def _train_and_report(
    table, spec: ModelSpec, architectures: dict[str, str], out: Path, iterations: int, shard_size, cluster,
    device: str, progress_bar: bool, strategy: str, priorities: bool,
) -> pd.DataFrame:  # fmt: skip
    """train_many's body once the run dir is claimed; `cluster` is an address or a LocalClusterInBackground."""
    logger = get_run_logger()
    valid, invalid = validate_series_task(table, spec)
    logger.info("%d series to train, %d invalid", len(valid), len(invalid))
    stage_series_task(valid, str(out))
    series_ids = [s.series_id for s in valid]
    train_windows = {s.series_id: spec.train_windows(s.length) for s in valid}
    architectures = {sid: a for sid, a in architectures.items() if sid in train_windows and a != spec.architecture}

    iteration_results, failures, plan = [], {}, {}
    if valid:
        address = cluster if isinstance(cluster, str) else cluster.address()
        with workers_report_to_this_api():
            runner = DaskTaskRunner(address=address)
            iteration_results, failures, plan = train_shards.with_options(task_runner=runner)(
                train_windows, spec, iterations, str(out), device, progress_bar, strategy, shard_size, priorities,
                architectures,
            )  # fmt: skip

    if not isinstance(cluster, str):
        cluster.close(wait=False)  # shuts down while the report is written
    results = results_table(series_ids, invalid, iteration_results, failures)
    tasks = tasks_table(iteration_results)
    schedule = schedule_summary(tasks, plan.get("workers", 1), plan)
    write_parquet(results, out / "results.parquet")
    write_parquet(tasks, out / "tasks.parquet")
    write_json(schedule, out / "schedule.json")
    plots = write_plots(results, tasks, out / "plots")
    counts = status_counts(results)
    create_markdown_artifact(
        key="train-many-summary", markdown=summary_markdown(results, tasks, plots, out, schedule),
        description=f"Summary of {len(results)} networks",
    )  # fmt: skip
    create_table_artifact(
        key="train-many-results",
        table=[{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
               for row in results.astype(object).where(results.notna(), None).to_dict("records")],
        description=f"One row per network: {counts}. Full table: {out / 'results.parquet'}",
    )  # fmt: skip
    logger.info("networks by status: %s; results in %s", counts, out / "results.parquet")
    return results
