"""The fused engine trains each network exactly as it would be trained alone."""

import math
import os
import time

import numpy as np
import pytest
import torch

from models import ModelSpec
from models.spec import ARCHITECTURES
from tasks.storage import checkpoint_path, load_checkpoint, network_dir, stage_values
from tasks.training import train_shard_iteration as train_on_device

SPEC = ModelSpec(hidden=16, layers=2, window=8, horizon=3, epochs_per_iteration=3, batch_size=16)


# CPU here and in CI; MANYNETS_TEST_DEVICE=cuda runs every test of this file on a GPU (benchmarks/gpu_check.sh).
DEVICE = os.environ.get("MANYNETS_TEST_DEVICE", "cpu")


def train_shard_iteration(*args, **kwargs):
    """tasks.training.train_shard_iteration on DEVICE."""
    return train_on_device(*args, **{"device": DEVICE, **kwargs})


def spec_for(architecture: str, **changes) -> ModelSpec:
    """SPEC in `architecture`, kept small so recurrent and attention networks train quickly on CPU."""
    size = {} if architecture == "mlp" else {"hidden": 8, "heads": 2, "epochs_per_iteration": 2, "batch_size": 64}
    return SPEC.model_copy(update={"architecture": architecture, **size, **changes})


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


def without_key_bias(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Drop the attention key bias: softmax is blind to it, so its true gradient is 0 and Adam
    turns the float noise left in its place into steps that differ between any two implementations.
    The forecasts do not depend on it (test_models checks the stacked forward against the single)."""
    if key.endswith("self_attn.in_proj_bias"):
        width = tensor.shape[0] // 3
        return torch.cat([tensor[:width], tensor[2 * width :]])
    return tensor


def assert_same_network(a, b, rtol=2e-4, atol=2e-5):
    keys = list(a["model"])
    for key in keys:
        torch.testing.assert_close(without_key_bias(key, a["model"][key]), without_key_bias(key, b["model"][key]),
                                   rtol=rtol, atol=atol)  # fmt: skip
    for pid, state in a["optimizer"]["state"].items():
        assert float(state["step"]) == float(b["optimizer"]["state"][pid]["step"])
        torch.testing.assert_close(without_key_bias(keys[pid], state["exp_avg"]),
                                   without_key_bias(keys[pid], b["optimizer"]["state"][pid]["exp_avg"]),
                                   rtol=rtol, atol=atol)  # fmt: skip
    assert a["metrics"]["train_windows"] == b["metrics"]["train_windows"]
    assert a["metrics"]["val_loss"] == pytest.approx(b["metrics"]["val_loss"], rel=rtol, abs=atol)
    assert a["metrics"]["train_loss"] == pytest.approx(b["metrics"]["train_loss"], rel=rtol, abs=atol)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fused_networks_match_their_solo_runs_over_iterations_with_ragged_lengths(ragged, architecture):
    root, ids = ragged
    spec = spec_for(architecture)
    for iteration in (1, 2, 3):
        fused = train_shard_iteration(0, ids, spec, iteration, str(root / "fused"), strategy="fused")
        alone = train_shard_iteration(0, ids, spec, iteration, str(root / "alone"), strategy="one_by_one")
        assert [n.status for n in fused.networks] == ["trained"] * 5
        for f, a in zip(fused.networks, alone.networks):
            assert f.series_id == a.series_id
            assert f.val_loss == pytest.approx(a.val_loss, rel=2e-4, abs=2e-5)
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 3), checkpoint(root / "alone", sid, 3))


@pytest.mark.parametrize("architecture", ["mlp", "gru"])
def test_the_gpus_rowwise_adam_trains_fused_networks_as_alone(ragged, monkeypatch, architecture):
    """The row-wise Adam a GPU uses, forced here: each network's own step count and decayed rate, and
    networks that stop early masked out of the steps."""
    import functools

    import tasks.fused
    from models.stacked import StackedAdam

    root, ids = ragged
    monkeypatch.setattr(tasks.fused, "StackedAdam", functools.partial(StackedAdam, rowwise=True))
    spec = spec_for(architecture, epochs_per_iteration=4, lr_decay=0.7, early_stopping_patience=1,
                    early_stopping_min_delta=0.02)  # fmt: skip
    for iteration in (1, 2):
        fused = train_shard_iteration(0, ids, spec, iteration, str(root / "fused"), strategy="fused")
        train_shard_iteration(0, ids, spec, iteration, str(root / "alone"), strategy="one_by_one")
    assert any(n.status == "stopped" for n in fused.networks), "the data should make some networks stop"
    for n in fused.networks:
        assert_same_network(checkpoint(root / "fused", n.series_id, n.iteration),
                            checkpoint(root / "alone", n.series_id, n.iteration))  # fmt: skip


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton's interpreter was not chosen before Triton was imported (tests/conftest.py)")
def test_the_gpus_lstm_layer_and_adam_train_fused_networks_as_alone(ragged, monkeypatch):
    """A GPU's whole fused LSTM path, forced here (its Triton kernels in Triton's CPU interpreter off a
    GPU): the stacked layer of models/gpu_recurrent.py and the row-wise Adam, with decay and early stopping."""
    import functools

    import tasks.fused
    from models import gpu_recurrent, native
    from models.stacked import StackedAdam

    if not gpu_recurrent.available():
        pytest.skip("Triton is not installed")
    root, ids = ragged
    layers = []
    monkeypatch.setattr(native, "usable", lambda x: False)
    monkeypatch.setattr(gpu_recurrent, "usable",
                        lambda x, hidden=None: layers.append(x.shape) or x.dtype == torch.float32)  # fmt: skip
    monkeypatch.setattr(tasks.fused, "StackedAdam", functools.partial(StackedAdam, rowwise=True))
    spec = spec_for("lstm", epochs_per_iteration=3, lr_decay=0.7, early_stopping_patience=1,
                    early_stopping_min_delta=0.02)  # fmt: skip
    for iteration in (1, 2):
        fused = train_shard_iteration(0, ids, spec, iteration, str(root / "fused"), strategy="fused")
        train_shard_iteration(0, ids, spec, iteration, str(root / "alone"), strategy="one_by_one")
    assert layers, "the fused steps should have run the GPU layer"
    for n in fused.networks:
        assert n.status in {"trained", "stopped"}
        assert_same_network(checkpoint(root / "fused", n.series_id, n.iteration),
                            checkpoint(root / "alone", n.series_id, n.iteration))  # fmt: skip


def test_a_fused_checkpoint_resumes_one_by_one_and_vice_versa(ragged):
    root, ids = ragged
    train_shard_iteration(0, ids, SPEC, 1, str(root / "fused"), strategy="fused")
    train_shard_iteration(0, ids, SPEC, 2, str(root / "fused"), strategy="one_by_one")
    train_shard_iteration(0, ids, SPEC, 3, str(root / "fused"), strategy="fused")
    for iteration in (1, 2, 3):
        train_shard_iteration(0, ids, SPEC, iteration, str(root / "alone"), strategy="one_by_one")
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 3), checkpoint(root / "alone", sid, 3))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_network_that_blows_up_fails_alone_and_the_others_still_match(ragged, architecture):
    root, ids = ragged
    spec = spec_for(architecture)
    for run in ("fused", "alone"):
        train_shard_iteration(0, ids, spec, 1, str(root / run), strategy="one_by_one")
    # Poison network n2's staged data for iteration 2: its loss becomes inf, the others are untouched.
    for run in ("fused", "alone"):
        values = np.load(network_dir(root / run, "n2") / "values.npy")
        values[-200:-20] = 3e38
        stage_values(root / run, "n2", values)
    fused = {n.series_id: n for n in train_shard_iteration(0, ids, spec, 2, str(root / "fused"), strategy="fused").networks}
    alone = {n.series_id: n for n in train_shard_iteration(0, ids, spec, 2, str(root / "alone")).networks}
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


def test_clipping_and_learning_rate_decay_are_per_network_and_match_alone(ragged):
    root, ids = ragged
    # A clip this small binds on every step, so a shard-wide norm would change every network.
    spec = SPEC.model_copy(update={"grad_clip": 0.05, "lr_decay": 0.7})
    for iteration in (1, 2):
        train_shard_iteration(0, ids, spec, iteration, str(root / "fused"), strategy="fused")
        train_shard_iteration(0, ids, spec, iteration, str(root / "alone"), strategy="one_by_one")
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 2), checkpoint(root / "alone", sid, 2))
    unclipped = train_shard_iteration(0, ids[:1], SPEC, 1, str(root / "unclipped"), strategy="fused")
    assert unclipped.networks[0].train_loss != pytest.approx(checkpoint(root / "fused", ids[0], 1)["metrics"]["train_loss"])


@pytest.mark.parametrize("architecture", ["mlp", "gru"])
def test_early_stopping_masks_a_network_out_and_it_matches_alone(ragged, architecture):
    root, ids = ragged
    spec = spec_for(architecture, epochs_per_iteration=6, early_stopping_patience=1, early_stopping_min_delta=0.02)
    results = {}
    for run, strategy in (("fused", "fused"), ("alone", "one_by_one")):
        first = train_shard_iteration(0, ids, spec, 1, str(root / run), strategy=strategy)
        second = train_shard_iteration(0, ids, spec, 2, str(root / run), strategy=strategy)
        results[run] = (first, second)
    first, second = results["fused"]
    stopped = {n.series_id for n in first.networks if n.status == "stopped"}
    assert stopped and stopped != set(ids), "the data should make some networks stop and others go on"
    assert stopped == {n.series_id for n in results["alone"][0].networks if n.status == "stopped"}
    for n in second.networks:
        if n.series_id in stopped:  # it trains no more: the iteration it stopped in stays its last
            assert n.status == "stopped" and n.skipped and n.iteration == 1 and "stopped early" in n.error
        else:
            assert n.iteration == 2
    for sid in ids:
        last = 1 if sid in stopped else 2
        fused, alone = checkpoint(root / "fused", sid, last), checkpoint(root / "alone", sid, last)
        assert fused["metrics"]["epochs_trained"] == alone["metrics"]["epochs_trained"]
        assert_same_network(fused, alone)
    assert all(checkpoint(root / "fused", sid, 1)["metrics"]["epochs_trained"] < 6 for sid in stopped)


@pytest.mark.parametrize("architecture", ["mlp", "lstm"])
def test_bf16_autocast_trains_in_both_strategies_and_changes_the_arithmetic(ragged, architecture):
    root, ids = ragged
    spec = spec_for(architecture, precision="bf16", epochs_per_iteration=1)
    fused = train_shard_iteration(0, ids, spec, 1, str(root / "fused"), strategy="fused")
    alone = train_shard_iteration(0, ids, spec, 1, str(root / "alone"), strategy="one_by_one")
    fp32 = train_shard_iteration(0, ids, spec_for(architecture, epochs_per_iteration=1), 1, str(root / "fp32"))
    assert all(n.status == "trained" and math.isfinite(n.val_loss) for n in fused.networks + alone.networks)
    # bf16 keeps ~3 significant digits: the two strategies agree loosely, and both differ from fp32.
    for f, a, full in zip(fused.networks, alone.networks, fp32.networks):
        assert f.val_loss == pytest.approx(a.val_loss, rel=0.1)
        assert a.val_loss != full.val_loss
    state = checkpoint(root / "fused", ids[0], 1)
    assert all(v.dtype == torch.float32 for v in state["model"].values())


def test_a_shard_wider_than_a_fused_group_trains_in_groups_that_still_match_alone(ragged, monkeypatch):
    import tasks.fused

    root, ids = ragged
    monkeypatch.setattr(tasks.fused, "fused_width", lambda architecture, device: 2)  # 5 networks: 3 groups
    spec = spec_for("gru")
    for iteration in (1, 2):
        train_shard_iteration(0, ids, spec, iteration, str(root / "fused"), strategy="fused")
        train_shard_iteration(0, ids, spec, iteration, str(root / "alone"), strategy="one_by_one")
    for sid in ids:
        assert_same_network(checkpoint(root / "fused", sid, 2), checkpoint(root / "alone", sid, 2))


def test_a_fused_groups_time_is_split_by_the_windows_each_network_trained(ragged, monkeypatch):
    import tasks.fused

    root, ids = ragged
    monkeypatch.setattr(tasks.fused, "fused_width", lambda architecture, device: 3)  # groups of 3 and 2
    started = time.perf_counter()
    result = train_shard_iteration(0, ids, SPEC, 1, str(root / "fused"), strategy="fused")
    wall = time.perf_counter() - started
    per_window = {n.series_id: n.seconds / n.train_windows for n in result.networks}
    # The longest three (700, 300, 130 points) share a group; within it every network shows the same seconds per window.
    groups = [["n1", "n3", "n2"], ["n0", "n4"]]
    for group in groups:
        assert per_window[group[0]] > 0
        for sid in group[1:]:
            assert per_window[sid] == pytest.approx(per_window[group[0]], rel=1e-9)
    assert 0 < sum(n.seconds for n in result.networks) <= wall


def test_fused_groups_are_capped_on_cpu_and_for_lstms_on_a_gpu_and_narrower_for_recurrent_and_attention_networks():
    from models import gpu_recurrent
    from tasks.fused import fused_width

    assert fused_width("mlp", "cuda") is None and fused_width("gru", "cuda:0") is None
    # LSTMs on the Triton layer: groups whose checkpoints are written while the next trains.
    assert fused_width("lstm", "cuda") == (415 if gpu_recurrent.available() else None)
    assert fused_width("lstm", "cpu") <= fused_width("transformer", "cpu") < fused_width("mlp", "cpu")
    assert fused_width("gru", "cpu") < fused_width("mlp", "cpu")


def test_recurrent_groups_are_narrower_where_the_compiled_layer_runs(monkeypatch):
    from models import native
    from tasks.fused import fused_width

    monkeypatch.setattr(native, "load", lambda: object())
    assert fused_width("lstm", "cpu") == fused_width("gru", "cpu") == 4
    monkeypatch.setattr(native, "load", lambda: None)
    assert fused_width("lstm", "cpu") == 8 and fused_width("gru", "cpu") == 16


def test_a_failed_checkpoint_write_fails_the_task_after_the_other_writes_and_journals_every_start(ragged, monkeypatch):
    # Checkpoints are written in background threads while later groups train; a write that fails
    # must still fail the task (Prefect retries it), never be reported trained.
    import tasks.fused
    import tasks.training
    from tasks.storage import read_journal

    root, ids = ragged
    monkeypatch.setattr(tasks.fused, "fused_width", lambda architecture, device: 2)
    real_write = tasks.training.write_iteration

    def write_or_fail(folder, *args):
        if folder == network_dir(root / "fused", "n2"):
            raise OSError("No space left on device")
        real_write(folder, *args)

    monkeypatch.setattr(tasks.training, "write_iteration", write_or_fail)
    with pytest.raises(OSError, match="No space"):
        train_shard_iteration(0, ids, SPEC, 1, str(root / "fused"), strategy="fused")
    for sid in ids:
        events = [(e["event"], e["iteration"]) for e in read_journal(network_dir(root / "fused", sid))]
        assert events == ([("start", 1)] if sid == "n2" else [("start", 1), ("done", 1)])
