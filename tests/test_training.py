import numpy as np
import pytest
import torch

from tasks.storage import checkpoint_iterations, checkpoint_path, load_checkpoint, network_dir, stage_values
from tasks.training import network_seed, train_network_iteration, train_shard_iteration


def weights(output_dir, series_id, iteration):
    return load_checkpoint(checkpoint_path(network_dir(output_dir, series_id), iteration))["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_one_iteration_trains_evaluates_and_checkpoints(staged, small_spec):
    output_dir, ids = staged
    outcome = train_network_iteration(ids[0], small_spec, 1, output_dir)
    assert outcome.status == "trained" and not outcome.skipped
    assert np.isfinite(outcome.train_loss) and np.isfinite(outcome.val_loss)
    assert outcome.train_windows > 0 and outcome.seconds > 0
    state = load_checkpoint(checkpoint_path(network_dir(output_dir, ids[0]), 1))
    assert state["iteration"] == 1 and state["spec"] == small_spec.fingerprint()
    assert state["metrics"]["val_loss"] == pytest.approx(outcome.val_loss)


def test_rerunning_a_finished_iteration_trains_nothing(staged, small_spec):
    output_dir, ids = staged
    first = train_network_iteration(ids[0], small_spec, 1, output_dir)
    path = checkpoint_path(network_dir(output_dir, ids[0]), 1)
    before = path.stat().st_mtime_ns
    again = train_network_iteration(ids[0], small_spec, 1, output_dir)
    assert again.skipped and again.seconds == 0.0
    assert again.val_loss == first.val_loss and again.train_loss == first.train_loss
    assert path.stat().st_mtime_ns == before


def test_an_iteration_whose_checkpoint_was_pruned_is_not_redone(staged, small_spec):
    from tasks.storage import checkpoint_iterations, read_journal

    output_dir, ids = staged
    third = train_network_iteration(ids[0], small_spec, 3, output_dir)
    folder = network_dir(output_dir, ids[0])
    assert checkpoint_iterations(folder) == [2, 3]  # iteration 1's checkpoint is pruned
    again = train_network_iteration(ids[0], small_spec, 1, output_dir)
    assert again.skipped and again.iteration == 3 and again.val_loss == third.val_loss
    assert checkpoint_iterations(folder) == [2, 3]
    assert [e["event"] for e in read_journal(folder)].count("done") == 3


def test_resumed_training_equals_an_uninterrupted_run(tmp_path, staged, small_spec):
    output_dir, ids = staged
    # Run A: iterations 1, 2, 3 as three separate task calls (resume from checkpoint each time).
    for iteration in (1, 2, 3):
        train_network_iteration(ids[1], small_spec, iteration, output_dir)
    # Run B: straight to iteration 3 in one call, in a fresh output dir with the same data.
    other = tmp_path / "other"
    stage_values(other, ids[1], np.load(network_dir(output_dir, ids[1]) / "values.npy"))
    train_network_iteration(ids[1], small_spec, 3, str(other))
    assert_same_weights(weights(output_dir, ids[1], 3), weights(other, ids[1], 3))


def test_corrupt_latest_checkpoint_is_reported_and_retrained_from_the_previous(staged, small_spec):
    output_dir, ids = staged
    for iteration in (1, 2):
        train_network_iteration(ids[0], small_spec, iteration, output_dir)
    good = weights(output_dir, ids[0], 2)
    path = checkpoint_path(network_dir(output_dir, ids[0]), 2)
    path.write_bytes(path.read_bytes()[:100])
    outcome = train_network_iteration(ids[0], small_spec, 2, output_dir)
    assert not outcome.skipped and any("iter-00002" in note for note in outcome.notes)
    assert_same_weights(weights(output_dir, ids[0], 2), good)


def test_only_the_newest_two_checkpoints_are_kept(staged, small_spec):
    output_dir, ids = staged
    for iteration in (1, 2, 3):
        train_network_iteration(ids[2], small_spec, iteration, output_dir)
    assert checkpoint_iterations(network_dir(output_dir, ids[2])) == [2, 3]


def test_one_bad_network_fails_alone_and_the_shard_goes_on(staged, small_spec):
    output_dir, ids = staged
    result = train_shard_iteration(7, [ids[0], "never-staged", ids[1]], small_spec, 1, output_dir)
    by_id = {n.series_id: n for n in result.networks}
    assert by_id[ids[0]].status == "trained" and by_id[ids[1]].status == "trained"
    assert by_id["never-staged"].status == "failed"
    assert "FileNotFoundError" in by_id["never-staged"].error
    assert result.shard_id == 7 and result.iteration == 1 and result.wall_seconds > 0


def test_a_network_whose_loss_explodes_fails_and_keeps_its_last_good_checkpoint(staged, small_spec):
    output_dir, ids = staged
    train_network_iteration(ids[0], small_spec, 1, output_dir)
    exploding = small_spec.model_copy(update={"learning_rate": 1e30})
    # A different spec is refused outright rather than mixing checkpoints...
    refused = train_shard_iteration(0, [ids[0]], exploding, 2, output_dir).networks[0]
    assert refused.status == "failed" and "another model spec" in refused.error
    # ...and in a fresh network the blown-up loss is caught before any checkpoint is written.
    exploded = train_shard_iteration(0, [ids[1]], exploding, 1, output_dir).networks[0]
    assert exploded.status == "failed" and "NonFiniteLoss" in exploded.error
    assert checkpoint_iterations(network_dir(output_dir, ids[1])) == []
    assert checkpoint_iterations(network_dir(output_dir, ids[0])) == [1]


def test_network_seeds_are_stable_and_distinct():
    assert network_seed(0, "a") == network_seed(0, "a")
    assert len({network_seed(0, "a"), network_seed(0, "b"), network_seed(1, "a")}) == 3


def flaky(real, fail_ids, exc=RuntimeError("bad batch"), times=1):
    """Wrap train_network_iteration so that `fail_ids` raise `exc` for their first `times` calls."""
    calls = {}

    def wrapper(series_id, *args, **kwargs):
        calls[series_id] = calls.get(series_id, 0) + 1
        if series_id in fail_ids and calls[series_id] <= times:
            raise exc
        return real(series_id, *args, **kwargs)

    return wrapper, calls


def test_a_network_that_raises_once_is_retried_within_the_task(staged, small_spec, monkeypatch):
    import tasks.training as training

    output_dir, ids = staged
    wrapper, calls = flaky(training.train_network_iteration, {ids[1]})
    monkeypatch.setattr(training, "train_network_iteration", wrapper)
    result = train_shard_iteration(0, ids, small_spec, 1, output_dir)
    assert [n.status for n in result.networks] == ["trained"] * 3
    assert calls == {ids[0]: 1, ids[1]: 2, ids[2]: 1}


def test_a_network_that_keeps_raising_is_failed_with_its_error_and_the_rest_finish(staged, small_spec, monkeypatch):
    import tasks.training as training

    output_dir, ids = staged
    wrapper, _ = flaky(training.train_network_iteration, {ids[0]}, times=99)
    monkeypatch.setattr(training, "train_network_iteration", wrapper)
    result = train_shard_iteration(0, ids, small_spec, 1, output_dir)
    first, *rest = result.networks
    assert first.status == "failed" and first.error == "RuntimeError: bad batch (after 2 attempts)"
    assert [n.status for n in rest] == ["trained", "trained"]


def test_out_of_memory_stops_the_task_and_reports_what_finished(staged, small_spec, monkeypatch):
    import tasks.training as training

    output_dir, ids = staged
    wrapper, _ = flaky(training.train_network_iteration, {ids[1]}, exc=torch.OutOfMemoryError("CUDA out of memory"))
    monkeypatch.setattr(training, "train_network_iteration", wrapper)
    result = train_shard_iteration(0, ids, small_spec, 1, output_dir)
    assert [n.series_id for n in result.networks] == [ids[0]]
    assert "OutOfMemoryError" in result.out_of_memory and repr(ids[1]) in result.out_of_memory


def test_the_journal_records_each_iteration_started_and_checkpointed(staged, small_spec):
    from tasks.storage import read_journal

    output_dir, ids = staged
    train_network_iteration(ids[0], small_spec, 2, output_dir)
    train_network_iteration(ids[0], small_spec, 2, output_dir)  # no-op: nothing journaled
    events = [(e["event"], e["iteration"]) for e in read_journal(network_dir(output_dir, ids[0]))]
    assert events == [("start", 1), ("done", 1), ("start", 2), ("done", 2)]
