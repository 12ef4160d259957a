"""Turn what the tasks reported into the run's tables: one row per network, one row per task."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from tasks.cost_model import percentage_errors
from tasks.series import InvalidSeries
from tasks.storage import atomic_write_bytes
from tasks.training import IterationResult

# Statuses of networks with trained weights: early-stopped ones count (their losses are real).
TRAINED = ("trained", "stopped")

RESULT_COLUMNS = [
    "series_id", "status", "reason", "iterations_done", "train_loss", "val_loss", "train_windows",
    "seconds", "task_seconds", "position", "shard_id", "checkpoint", "notes",
]  # fmt: skip


TASK_COLUMNS = [
    "shard_id", "iteration", "strategy", "worker", "submitted", "started", "finished", "wall_seconds", "predicted_seconds",
    "error_percent", "priority", "dask_priority", "networks", "trained", "skipped", "failed",
]  # fmt: skip


def tasks_table(results: list[IterationResult]) -> pd.DataFrame:
    """One row per iteration task: where and when it ran, what it did, and what the cost model said.

    `predicted_seconds` is the cost model's prediction when the task was submitted (before its own
    time was seen), `error_percent` its signed error against `wall_seconds`; `priority` is what
    the driver asked Dask for and `dask_priority` what the worker really held the task under.
    """
    rows = [
        {
            "shard_id": r.shard_id,
            "iteration": r.iteration,
            "strategy": r.strategy,
            "worker": r.worker,
            "submitted": r.submitted,
            "started": r.started,
            "finished": r.finished,
            "wall_seconds": r.wall_seconds,
            "predicted_seconds": r.predicted_seconds,
            "priority": r.priority,
            "dask_priority": r.dask_priority,
            "networks": len(r.networks),
            "trained": sum(n.status == "trained" and not n.skipped for n in r.networks),
            "skipped": sum(n.skipped for n in r.networks),
            "failed": sum(n.status == "failed" for n in r.networks),
        }
        for r in results
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=TASK_COLUMNS)
    for column in ("submitted", "predicted_seconds"):
        table[column] = table[column].astype(float)
    table["error_percent"] = percentage_errors(table["predicted_seconds"], table["wall_seconds"])
    for column in ("priority", "dask_priority"):
        table[column] = table[column].astype("Int64")
    return table.sort_values(["started", "shard_id"], ignore_index=True)


def worker_gaps(tasks: pd.DataFrame) -> pd.Series:
    """Seconds each worker spent between one task's end and the next one's start while it waited.

    Only gaps where the next task had already been submitted count: those are the per-task cost of
    Prefect and Dask (state changes, scheduling, transfer), not idleness for lack of work.
    """
    gaps = []
    for _, mine in tasks.sort_values("started").groupby("worker"):
        previous_end = mine["finished"].shift()
        waiting = mine["submitted"].notna() & (mine["submitted"] <= previous_end)
        gaps.append((mine["started"] - previous_end)[waiting])
    return pd.concat(gaps) if gaps else pd.Series(dtype=float)


def schedule_summary(tasks: pd.DataFrame, workers: int, plan: dict | None = None) -> dict:
    """How well a run used its cluster and how well the cost model predicted it.

    makespan: first task start to last task end. lower_bound: max(total task seconds / workers,
    longest chain of one shard) - no schedule of these tasks can beat it. MAPE: median absolute
    percentage error of the predictions, overall and from iteration 2 on (after the model has seen
    the run's first tasks).
    """
    summary = {"tasks": int(len(tasks)), "workers": int(workers), **(plan or {})}
    if not len(tasks):
        return summary
    makespan = float(tasks["finished"].max() - tasks["started"].min())
    bound = max(float(tasks["wall_seconds"].sum()) / max(workers, 1),
                float(tasks.groupby("shard_id")["wall_seconds"].sum().max()))  # fmt: skip
    errors = percentage_errors(tasks["predicted_seconds"], tasks["wall_seconds"]).abs()
    later = errors[tasks.loc[errors.index, "iteration"] >= 2]
    asked = tasks["priority"].notna()
    gaps = worker_gaps(tasks)
    summary.update(
        makespan_seconds=makespan,
        lower_bound_seconds=bound,
        makespan_over_bound=makespan / bound if bound > 0 else None,
        predicted_tasks=int(len(errors)),
        mape_percent=float(errors.median()) if len(errors) else None,
        mape_after_first_iteration_percent=float(later.median()) if len(later) else None,
        priorities_asked=int(asked.sum()),
        priorities_seen_by_dask=int((tasks.loc[asked, "priority"] == tasks.loc[asked, "dask_priority"]).sum()),
        median_overhead_gap_seconds=float(gaps.median()) if len(gaps) else None,
        mean_task_seconds=float(tasks["wall_seconds"].mean()),
    )
    return summary


def results_table(
    series_ids: list[str], invalid: list[InvalidSeries], results: list[IterationResult],
    failures: dict[str, str] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per network, in input order: its final status, losses, time and checkpoint.

    `seconds` is the network's own training time summed over iterations; `task_seconds` the wall
    time of the tasks that trained it; `position` the order in which its first task started (the
    axis along which a slowdown would show). `failures` maps series ids whose task failed as a
    whole (after Prefect's retries, or lost by Dask) to the error: they end `failed`, keeping the
    iterations they did finish. `notes` lists checkpoint problems met on the way (e.g. a corrupt
    checkpoint that was skipped and retrained).
    """
    failures = failures or {}
    ordered = sorted(results, key=lambda r: (r.iteration, r.started))
    first_start: dict[str, float] = {}
    rows: dict[str, dict] = {}
    for result in ordered:
        for outcome in result.networks:
            row = rows.setdefault(
                outcome.series_id, {"seconds": 0.0, "task_seconds": 0.0, "reason": None, "notes": []}
            )
            row["notes"] += outcome.notes
            first_start.setdefault(outcome.series_id, result.started)
            row["seconds"] += outcome.seconds
            row["task_seconds"] += result.wall_seconds
            row.update(
                status=outcome.status,
                iterations_done=outcome.iteration,
                train_windows=outcome.train_windows or row.get("train_windows", 0),
                shard_id=result.shard_id,
                checkpoint=outcome.checkpoint,
            )
            if outcome.status in TRAINED:  # stopped: its reason says when and why
                row.update(train_loss=outcome.train_loss, val_loss=outcome.val_loss, reason=outcome.error)
            else:
                row["reason"] = outcome.error
    positions = {sid: rank for rank, sid in enumerate(sorted(first_start, key=first_start.__getitem__))}
    table = []
    for series_id in series_ids:
        row = rows.get(series_id)
        if row is None:
            error = failures.get(series_id, "never trained: its task did not report")
            table.append({"series_id": series_id, "status": "failed", "reason": error, "iterations_done": 0})
            continue
        row = {**row, "notes": "; ".join(row["notes"]) or None}
        if series_id in failures:
            row.update(status="failed", reason=failures[series_id])
        table.append({"series_id": series_id, "position": positions.get(series_id), **row})
    table += [{"series_id": bad.series_id, "status": "invalid", "reason": bad.reason, "iterations_done": 0}
              for bad in invalid]  # fmt: skip
    frame = pd.DataFrame(table).reindex(columns=RESULT_COLUMNS)
    frame["iterations_done"] = frame["iterations_done"].fillna(0).astype(int)
    frame["position"] = frame["position"].astype("Int64")
    frame["shard_id"] = frame["shard_id"].astype("Int64")
    frame["train_windows"] = frame["train_windows"].fillna(0).astype(int)
    return frame


def write_parquet(table: pd.DataFrame, path: Path) -> Path:
    """Write `table` to `path` atomically (a reader sees the old file or the new one)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def status_counts(results: pd.DataFrame) -> dict[str, int]:
    """How many networks ended in each status."""
    return {str(k): int(v) for k, v in results["status"].value_counts().sort_index().items()}


def write_json(payload: dict, path: Path) -> Path:
    """Write `payload` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
    return path
