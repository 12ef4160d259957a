"""The fused engine trains each network exactly as it would be trained alone."""

import math

import numpy as np
import pytest
import torch

from models import ModelSpec
from tasks.storage import checkpoint_path, load_checkpoint, network_dir, stage_values
from tasks.training import train_shard_iteration

SPEC = ModelSpec(hidden=16, layers=2, window=8, horizon=3, epochs_per_iteration=3, batch_size=16)


@pytest.fixture
def ragged(tmp_path):
    """Five series of very different lengths (3 to 40 batches) staged twice: for fused and for alone."""
    rng = np.random.default_rng(3)
    ids = [f"n{i}" for i in range(5)]
    for i, (sid, length) in enumerate(zip(ids, [60, 700, 130, 300, 45])):
        t = np.arange(length)
        values = (np.sin(t / (3 + i)) + 0.2 * rng.normal(size=length)).astype(np.float32)
        for run in ("fused", "alone"):
            stage_values(tmp_path / run, sid, values)
    return tmp_path, ids


def checkpoint(root, sid, iteration):
    return load_checkpoint(checkpoint_path(network_dir(root, sid), iteration))


def assert_same_network(a, b, rtol=2e-4, atol=2e-5):
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=rtol, atol=atol)
    for pid, state in a["optimizer"]["state"].items():
        assert float(state["step"]) == float(b["optimizer"]["state"][pid]["step"])
        torch.testing.assert_close(state["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"], rtol=rtol, atol=atol)
    assert a["metrics"]["train_windows"] == b["metrics"]["train_windows"]
    assert a["metrics"]["val_loss"] == pytest.approx(b["metrics"]["val_loss"], rel=rtol, abs=atol)
    assert a["metrics"]["train_loss"] == pytest.approx(b["metrics"]["train_loss"], rel=rtol, abs=atol)


def test_fused_networks_match_their_solo_runs_over_iterations_with_ragged_lengths(ragged):
    root, ids = ragged
    for iteration in (1, 2, 3):
        fused = train_shard_iteration(0, ids, SPEC, iteration, str(root / "fused"), strategy="fused")
        alone = train_shard_iteration(0, ids, SPEC, iteration, str(root / "alone"), strategy="one_by_one")
        assert [n.status for n in fused.networks] == ["trained"] * 5
        for f, a in zip(fused.networks, alone.networks):
            assert f.series_id == a.series_id
            assert f.val_loss == pytest.approx(a.val_loss, rel=2e-4, abs=2e-5)
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 3), checkpoint(root / "alone", sid, 3))


def test_a_fused_checkpoint_resumes_one_by_one_and_vice_versa(ragged):
    root, ids = ragged
    train_shard_iteration(0, ids, SPEC, 1, str(root / "fused"), strategy="fused")
    train_shard_iteration(0, ids, SPEC, 2, str(root / "fused"), strategy="one_by_one")
    train_shard_iteration(0, ids, SPEC, 3, str(root / "fused"), strategy="fused")
    for iteration in (1, 2, 3):
        train_shard_iteration(0, ids, SPEC, iteration, str(root / "alone"), strategy="one_by_one")
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 3), checkpoint(root / "alone", sid, 3))


def test_a_network_that_blows_up_fails_alone_and_the_others_still_match(ragged, monkeypatch):
    root, ids = ragged
    for run in ("fused", "alone"):
        train_shard_iteration(0, ids, SPEC, 1, str(root / run), strategy="one_by_one")
    # Poison network n2's staged data for iteration 2: its loss becomes inf, the others are untouched.
    for run in ("fused", "alone"):
        values = np.load(network_dir(root / run, "n2") / "values.npy")
        values[-200:-20] = 3e38
        stage_values(root / run, "n2", values)
    fused = {n.series_id: n for n in train_shard_iteration(0, ids, SPEC, 2, str(root / "fused"), strategy="fused").networks}
    alone = {n.series_id: n for n in train_shard_iteration(0, ids, SPEC, 2, str(root / "alone")).networks}
    assert fused["n2"].status == "failed" and "NonFiniteLoss" in fused["n2"].error
    assert alone["n2"].status == "failed"
    assert fused["n2"].iteration == 1 and checkpoint(root / "fused", "n2", 1)["iteration"] == 1
    for sid in ("n0", "n1", "n3", "n4"):
        assert fused[sid].status == "trained"
        assert_same_network(checkpoint(root / "fused", sid, 2), checkpoint(root / "alone", sid, 2))


def test_networks_the_fused_path_cannot_take_still_train_or_fail_one_by_one(ragged):
    root, ids = ragged
    out = str(root / "fused")
    train_shard_iteration(0, ids[:2], SPEC, 1, out, strategy="fused")  # n0, n1 one iteration ahead
    result = train_shard_iteration(0, ids + ["never-staged"], SPEC, 1, out, strategy="fused")
    by_id = {n.series_id: n for n in result.networks}
    assert [n.series_id for n in result.networks] == ids + ["never-staged"]
    assert by_id["n0"].skipped and by_id["n1"].skipped
    assert all(by_id[s].status == "trained" and not by_id[s].skipped for s in ids[2:])
    assert by_id["never-staged"].status == "failed" and "FileNotFoundError" in by_id["never-staged"].error


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy must be one of one_by_one, fused"):
        train_shard_iteration(0, [], SPEC, 1, "/nonexistent", strategy="vmap")


def test_expanding_window_fused_matches_alone_and_grows_each_iteration(ragged):
    root, ids = ragged
    spec = SPEC.model_copy(update={"expanding_window": True, "expanding_start": 0.4})
    for iteration in (1, 2, 3):
        fused = train_shard_iteration(0, ids, spec, iteration, str(root / "fused"), strategy="fused")
        alone = train_shard_iteration(0, ids, spec, iteration, str(root / "alone"), strategy="one_by_one")
        for f, a in zip(fused.networks, alone.networks):
            assert f.train_windows == a.train_windows
            assert f.val_loss == pytest.approx(a.val_loss, rel=2e-4, abs=2e-5)
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 3), checkpoint(root / "alone", sid, 3))
    windows = [[checkpoint(root / "alone", "n1", i)["metrics"]["train_windows"] for i in (2, 3)]]
    full = spec.train_windows(700)
    assert windows == [[math.ceil(0.8 * full), full]]
