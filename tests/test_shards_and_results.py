import pandas as pd
import pytest

from tasks.results import results_table, status_counts, tasks_table
from tasks.series import InvalidSeries
from tasks.shards import ShardPlan, plan_fixed_shards
from tasks.training import IterationResult, NetworkOutcome


def test_fixed_shards_cover_every_network_once_in_order():
    shards = plan_fixed_shards([f"s{i}" for i in range(7)], 3)
    assert shards == [
        ShardPlan(0, ("s0", "s1", "s2")),
        ShardPlan(1, ("s3", "s4", "s5")),
        ShardPlan(2, ("s6",)),
    ]
    assert len(plan_fixed_shards(["a", "b"], 1)) == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_bad_shard_size_is_rejected_with_what_is_expected(bad):
    with pytest.raises(ValueError, match="shard_size must be .auto. .planned from the cost model. or an integer >= 1"):
        plan_fixed_shards(["a"], bad)


def outcome(series_id, status="trained", iteration=1, seconds=0.1):
    return NetworkOutcome(series_id, status, iteration, 0.5, 0.6, 10, seconds, f"/c/{series_id}",
                          error=None if status == "trained" else "boom")  # fmt: skip


def test_results_table_has_one_row_per_network_with_its_final_state():
    results = [
        IterationResult(0, 1, [outcome("a"), outcome("b")], "w1", started=10.0, finished=11.0),
        IterationResult(1, 1, [outcome("c", "failed", 0)], "w2", started=9.0, finished=9.5),
        IterationResult(0, 2, [outcome("a", iteration=2), outcome("b", iteration=2)], "w1", 11.0, 13.0),
    ]
    table = results_table(["a", "b", "c", "d"], [InvalidSeries("e", "constant series")], results,
                          {"d": "task shard-9-iter-1 failed after retries"})  # fmt: skip
    rows = table.set_index("series_id")
    assert list(table["series_id"]) == ["a", "b", "c", "d", "e"]
    assert rows.loc["a", "status"] == "trained" and rows.loc["a", "iterations_done"] == 2
    assert rows.loc["a", "seconds"] == pytest.approx(0.2)
    assert rows.loc["a", "task_seconds"] == pytest.approx(3.0)
    assert rows.loc["c", "status"] == "failed" and rows.loc["c", "reason"] == "boom"
    assert rows.loc["d", "status"] == "failed" and "shard-9" in rows.loc["d", "reason"]
    assert rows.loc["e", "status"] == "invalid" and rows.loc["e", "reason"] == "constant series"
    # position follows the start time of a network's first task: c's task started first.
    assert rows.loc["c", "position"] == 0 and rows.loc["a", "position"] == 1
    assert status_counts(table) == {"failed": 2, "invalid": 1, "trained": 2}
    tasks = tasks_table(results)
    assert list(tasks["wall_seconds"]) == pytest.approx([0.5, 1.0, 2.0])
    assert tasks["failed"].sum() == 1


def test_split_shard_halves_with_fresh_ids():
    from tasks.shards import split_shard

    assert split_shard(("a", "b", "c"), 10) == [ShardPlan(10, ("a", "b")), ShardPlan(11, ("c",))]
    assert split_shard(("a",), 4) == [ShardPlan(4, ("a",))]
    assert split_shard((), 4) == []


def test_a_network_whose_later_task_failed_ends_failed_but_keeps_its_iterations():
    results = [IterationResult(0, 1, [outcome("a")], "w", 0.0, 1.0)]
    table = results_table(["a"], [], results, {"a": "task shard-0-iter-2 failed after retries: boom"})
    row = table.iloc[0]
    assert row["status"] == "failed" and row["iterations_done"] == 1 and "iter-2" in row["reason"]


def test_schedule_summary_measures_makespan_bound_errors_and_overhead_gaps():
    from tasks.results import schedule_summary

    tasks = pd.DataFrame({
        "shard_id": [0, 0, 1, 2], "iteration": [1, 2, 1, 1], "worker": ["w1", "w1", "w2", "w2"],
        "submitted": [0.0, 4.0, 0.0, 0.0], "started": [0.0, 4.5, 0.1, 3.2], "finished": [4.0, 8.0, 3.0, 5.0],
        "wall_seconds": [4.0, 3.5, 2.9, 1.8], "predicted_seconds": [3.0, 3.5, None, 2.0],
        "priority": pd.array([2, 1, None, None], dtype="Int64"), "dask_priority": pd.array([2, 1, 0, 0], dtype="Int64"),
    })  # fmt: skip
    summary = schedule_summary(tasks, 2, {"planned": True})
    assert summary["planned"] and summary["tasks"] == 4
    assert summary["makespan_seconds"] == 8.0
    assert summary["lower_bound_seconds"] == 7.5  # shard 0's chain, above 12.2 / 2
    assert summary["mape_percent"] == pytest.approx(100 * 0.2 / 1.8)  # median of 25%, 0% and 11.1%
    assert summary["mape_after_first_iteration_percent"] == 0.0
    assert summary["priorities_asked"] == 2 and summary["priorities_seen_by_dask"] == 2
    # w1 waited 0.5 s with shard 0's iteration 2 already submitted; w2's 0.2 s gap counts too.
    assert summary["median_overhead_gap_seconds"] == pytest.approx(0.35)
