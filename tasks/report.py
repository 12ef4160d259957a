"""A run's report where users look: PNG plots and a markdown summary (plain functions of the tables)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # workers and served runs have no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tasks.results import TRAINED  # noqa: E402


def plot_loss_distribution(results: pd.DataFrame, path: Path) -> Path:
    """Histogram of the trained networks' validation losses (log scale)."""
    trained = results.loc[results["status"].isin(TRAINED), "val_loss"].dropna()
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(trained):
        ax.hist(trained.clip(lower=1e-6), bins=min(50, max(5, len(trained) // 10)), log=False)
        ax.set_xscale("log")
    ax.set(title=f"Validation loss of {len(trained)} trained networks", xlabel="val MSE (normalised)",
           ylabel="networks")  # fmt: skip
    return _save(fig, path)


def plot_time_by_position(results: pd.DataFrame, path: Path) -> Path:
    """Training seconds per window against start order: a flat cloud means no slowdown."""
    done = results["status"].isin(TRAINED)
    trained = results[done & results["position"].notna() & (results["seconds"] > 0)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(trained):
        ax.scatter(trained["position"].astype(float), trained["seconds"] / trained["train_windows"].clip(lower=1),
                   s=4, alpha=0.5)  # fmt: skip
        ax.set_yscale("log")
    ax.set(title="Time per network by start order (flat = no slowdown)", xlabel="position (start order)",
           ylabel="training seconds per window")  # fmt: skip
    return _save(fig, path)


def plot_task_gantt(tasks: pd.DataFrame, path: Path) -> Path:
    """One row per worker, one bar per task: how busy the cluster was and where it idled."""
    fig, ax = plt.subplots(figsize=(9, 0.6 * max(2, tasks["worker"].nunique()) + 1.5))
    if len(tasks):
        origin = tasks["started"].min()
        workers = sorted(tasks["worker"].unique())
        for row, worker in enumerate(workers):
            mine = tasks[tasks["worker"] == worker]
            ax.broken_barh(list(zip(mine["started"] - origin, mine["wall_seconds"])), (row - 0.4, 0.8),
                           facecolors=[f"C{i % 10}" for i in mine["iteration"]])  # fmt: skip
        ax.set_yticks(range(len(workers)), workers)
        span = tasks["finished"].max() - origin
        ax.set_title(f"{len(tasks)} task(s) on {len(workers)} worker(s), makespan {span:.2f} s (colour = iteration)")
    ax.set_xlabel("seconds since the first task started")
    return _save(fig, path)


def plot_predicted_vs_actual(tasks: pd.DataFrame, path: Path) -> Path:
    """Each task's predicted against its measured seconds (log-log): on the diagonal = exact."""
    known = tasks.dropna(subset=["predicted_seconds"])
    known = known[(known["predicted_seconds"] > 0) & (known["wall_seconds"] > 0)]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if len(known):
        for iteration, rows in known.groupby("iteration"):
            ax.scatter(rows["wall_seconds"], rows["predicted_seconds"], s=8, alpha=0.6, label=f"iteration {iteration}")
        low = min(known["wall_seconds"].min(), known["predicted_seconds"].min())
        high = max(known["wall_seconds"].max(), known["predicted_seconds"].max())
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set(xscale="log", yscale="log")
        ax.legend(fontsize="small")
    ax.set(title="Cost model: predicted vs measured task seconds", xlabel="measured s", ylabel="predicted s")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: pd.DataFrame, tasks: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """All the run's plots as PNGs under `folder`; returns their paths by name."""
    return {
        "validation loss": plot_loss_distribution(results, folder / "loss_distribution.png"),
        "time per network": plot_time_by_position(results, folder / "time_by_position.png"),
        "tasks per worker": plot_task_gantt(tasks, folder / "tasks_gantt.png"),
        "predicted vs measured": plot_predicted_vs_actual(tasks, folder / "predicted_vs_actual.png"),
    }


def summary_markdown(
    results: pd.DataFrame, tasks: pd.DataFrame, plots: dict[str, Path], output_dir: Path,
    schedule: dict | None = None, slowest: int = 10,
) -> str:  # fmt: skip
    """The markdown summary of a run: counts by status, slowest networks, failures, where things are."""
    counts = results["status"].value_counts()
    lines = [f"# train_many: {len(results)} networks", "", "| status | networks |", "|---|---|"]
    lines += [f"| {status} | {count} |" for status, count in counts.items()]
    if len(tasks):
        makespan = tasks["finished"].max() - tasks["started"].min()
        lines += ["", f"{len(tasks)} tasks on {tasks['worker'].nunique()} worker(s), makespan {makespan:.1f} s."]
    if schedule and schedule.get("makespan_seconds") is not None:
        lines += ["", "## Schedule and cost model", "", "| measure | value |", "|---|---|"]
        lines += [f"| {label} | {_fmt(schedule.get(key), unit)} |" for label, key, unit in _SCHEDULE_ROWS]
    trained = results[results["status"].isin(TRAINED)]
    if len(trained):
        lines += ["", f"Median validation loss {trained['val_loss'].median():.4f} (normalised MSE)."]
        lines += ["", f"## Slowest {min(slowest, len(trained))} networks", "",
                  "| series_id | seconds | train windows | val loss |", "|---|---|---|---|"]  # fmt: skip
        for row in trained.nlargest(slowest, "seconds").itertuples():
            lines.append(f"| `{row.series_id}` | {row.seconds:.3f} | {row.train_windows} | {row.val_loss:.4f} |")
    for status in ("failed", "invalid"):
        bad = results[results["status"] == status]
        if len(bad):
            lines += ["", f"## {status.capitalize()} ({len(bad)})", "", "| series_id | reason |", "|---|---|"]
            lines += [f"| `{r.series_id}` | {str(r.reason).replace('|', '/')} |" for r in bad.head(50).itertuples()]
            if len(bad) > 50:
                lines.append(f"| ... | {len(bad) - 50} more in results.parquet |")
    lines += ["", "## Files", "", f"- results: `{output_dir / 'results.parquet'}`",
              f"- tasks: `{output_dir / 'tasks.parquet'}`", f"- schedule: `{output_dir / 'schedule.json'}`"]  # fmt: skip
    lines += [f"- plot, {name}: `{path}`" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


_SCHEDULE_ROWS = [
    ("workers", "workers", ""), ("shards", "shards", ""),
    ("makespan", "makespan_seconds", "s"), ("lower bound max(work / workers, longest chain)", "lower_bound_seconds", "s"),
    ("makespan / lower bound", "makespan_over_bound", "x"),
    ("median abs. % error of predictions, all tasks", "mape_percent", "%"),
    ("median abs. % error from iteration 2", "mape_after_first_iteration_percent", "%"),
    ("tasks given a priority", "priorities_asked", ""),
    ("of those, held at that priority by a Dask worker", "priorities_seen_by_dask", ""),
    ("Prefect+Dask overhead per task (median worker gap)", "median_overhead_gap_seconds", "s"),
]  # fmt: skip


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{' ' + unit if unit and unit != 'x' else unit}"
    return str(value)
