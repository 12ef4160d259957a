import pandas as pd

from tasks.report import summary_markdown, write_plots


def tables():
    results = pd.DataFrame({
        "series_id": ["a", "b", "c", "d"],
        "status": ["trained", "trained", "failed", "invalid"],
        "reason": [None, None, "RuntimeError: x | y", "constant series"],
        "val_loss": [0.1, 0.3, None, None],
        "seconds": [0.5, 2.0, 0.1, None],
        "train_windows": [100, 400, 0, 0],
        "position": pd.array([0, 1, 2, None], dtype="Int64"),
    })  # fmt: skip
    tasks = pd.DataFrame({"shard_id": [0, 1], "iteration": [1, 1], "worker": ["w1", "w2"], "started": [10.0, 10.5],
                          "finished": [12.0, 13.0], "wall_seconds": [2.0, 2.5], "predicted_seconds": [1.8, 3.0]})  # fmt: skip
    return results, tasks


def test_plots_are_written_as_pngs(tmp_path):
    results, tasks = tables()
    plots = write_plots(results, tasks, tmp_path / "plots")
    assert set(plots) == {"validation loss", "time per network", "tasks per worker", "predicted vs measured"}
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plots_survive_a_run_where_nothing_trained(tmp_path):
    results, tasks = tables()
    nothing = results.assign(status="invalid")
    assert all(p.exists() for p in write_plots(nothing, tasks.iloc[:0], tmp_path).values())


def test_summary_counts_statuses_lists_slowest_and_failures_with_reasons(tmp_path):
    results, tasks = tables()
    text = summary_markdown(results, tasks, {"tasks per worker": tmp_path / "g.png"}, tmp_path, slowest=1)
    assert "# train_many: 4 networks" in text
    assert "| trained | 2 |" in text and "| failed | 1 |" in text and "| invalid | 1 |" in text
    assert "2 tasks on 2 worker(s), makespan 3.0 s." in text
    assert "## Slowest 1 networks" in text and "| `b` | 2.000 | 400 | 0.3000 |" in text
    assert "| `c` | RuntimeError: x / y |" in text  # a '|' in a reason cannot break the table
    assert "| `d` | constant series |" in text
    assert f"`{tmp_path / 'g.png'}`" in text


def test_summary_has_the_schedule_and_cost_model_section(tmp_path):
    from tasks.results import schedule_summary

    results, tasks = tables()
    tasks = tasks.assign(submitted=[9.0, 9.0], priority=pd.array([5, None], dtype="Int64"),
                         dask_priority=pd.array([5, 0], dtype="Int64"))  # fmt: skip
    schedule = schedule_summary(tasks, 2, {"shards": 2})
    text = summary_markdown(results, tasks, {}, tmp_path, schedule)
    assert "## Schedule and cost model" in text
    assert "| makespan | 3.00 s |" in text and "| lower bound max(work / workers, longest chain) | 2.50 s |" in text
    assert "| median abs. % error of predictions, all tasks | 15.00 % |" in text
    assert "| tasks given a priority | 1 |" in text and "| of those, held at that priority by a Dask worker | 1 |" in text
