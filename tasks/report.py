"""A run's report where users look: PNG plots and a markdown summary (plain functions of the tables)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # workers and served runs have no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_loss_distribution(results: pd.DataFrame, path: Path) -> Path:
    """Histogram of the trained networks' validation losses (log scale)."""
    trained = results.loc[results["status"] == "trained", "val_loss"].dropna()
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(trained):
        ax.hist(trained.clip(lower=1e-6), bins=min(50, max(5, len(trained) // 10)), log=False)
        ax.set_xscale("log")
    ax.set(title=f"Validation loss of {len(trained)} trained networks", xlabel="val MSE (normalised)",
           ylabel="networks")  # fmt: skip
    return _save(fig, path)


def plot_time_by_position(results: pd.DataFrame, path: Path) -> Path:
    """Training seconds per window against start order: a flat cloud means no slowdown."""
    trained = results[(results["status"] == "trained") & results["position"].notna() & (results["seconds"] > 0)]
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
    }


def summary_markdown(
    results: pd.DataFrame, tasks: pd.DataFrame, plots: dict[str, Path], output_dir: Path, slowest: int = 10
) -> str:
    """The markdown summary of a run: counts by status, slowest networks, failures, where things are."""
    counts = results["status"].value_counts()
    lines = [f"# train_many: {len(results)} networks", "", "| status | networks |", "|---|---|"]
    lines += [f"| {status} | {count} |" for status, count in counts.items()]
    if len(tasks):
        makespan = tasks["finished"].max() - tasks["started"].min()
        lines += ["", f"{len(tasks)} tasks on {tasks['worker'].nunique()} worker(s), makespan {makespan:.1f} s."]
    trained = results[results["status"] == "trained"]
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
              f"- tasks: `{output_dir / 'tasks.parquet'}`"]  # fmt: skip
    lines += [f"- plot, {name}: `{path}`" for name, path in plots.items()]
    return "\n".join(lines) + "\n"
