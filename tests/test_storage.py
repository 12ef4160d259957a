import os

import numpy as np
import pytest
import torch

from tasks.storage import (
    CheckpointError,
    checkpoint_iterations,
    checkpoint_path,
    claim_run_dir,
    latest_valid_checkpoint,
    load_checkpoint,
    network_dir,
    prune_checkpoints,
    read_values,
    safe_name,
    save_checkpoint,
    stage_values,
)


def test_checkpoint_round_trip_keeps_tensors_and_metadata(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "metrics": {"val_loss": 0.5}, "iteration": 3}
    path = tmp_path / "iter-00003.ckpt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["metrics"] == {"val_loss": 0.5} and loaded["iteration"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["iter-00003.ckpt"]  # no temporary file left


def test_checkpoint_bodies_are_safetensors_byte_for_byte_and_bfloat16_still_round_trips(tmp_path):
    import safetensors.torch

    from tasks.storage import _safetensors_bytes

    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7.0), "rng": torch.arange(5, dtype=torch.uint8)}
    assert _safetensors_bytes(tensors, {"a": "b"}) == safetensors.torch.save(tensors, metadata={"a": "b"})
    state = {"model": {"w": torch.randn(2, 3, dtype=torch.bfloat16)}, "step": torch.tensor(2.0)}
    save_checkpoint(tmp_path / "iter-00001.ckpt", state)
    loaded = load_checkpoint(tmp_path / "iter-00001.ckpt")
    assert loaded["model"]["w"].dtype == torch.bfloat16 and torch.equal(loaded["model"]["w"], state["model"]["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bodies_encoded_together_are_byte_for_byte_each_networks_own_body(dtype):
    from tasks.storage import checkpoint_bodies, checkpoint_body

    generator = torch.Generator().manual_seed(0)
    count = 5
    stacked = {"model": {"w": torch.randn(count, 3, 4, generator=generator).to(dtype), "b": torch.randn(count, 4)},
               "optimizer": {"state": {0: {"step": torch.arange(count, dtype=torch.float32),
                                           "exp_avg": torch.rand(count, 3, 4, generator=generator)}},
                             "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}]},
               "generator": torch.randint(0, 255, (count, 7), dtype=torch.uint8, generator=generator)}  # fmt: skip
    own = [{"iteration": 2, "metrics": {"val_loss": 0.1 * k, "best": float("inf"), "note": None, "name": "é\"x"},
            "scale": {"mean": k, "std": 1.5}} for k in range(count)]  # fmt: skip
    bodies = checkpoint_bodies(own, stacked)

    def row(value, k):
        if isinstance(value, torch.Tensor):
            return value[k]
        if isinstance(value, dict):
            return {key: row(item, k) for key, item in value.items()}
        return value

    assert len(bodies) == count
    for k in range(count):
        assert b"".join(bodies[k]) == checkpoint_body({**own[k], **row(stacked, k)})


def test_a_body_written_in_parts_is_the_file_its_joined_bytes_give_and_loads(tmp_path):
    from tasks.storage import checkpoint_bodies, load_checkpoint, write_checkpoint_body

    stacked = {"model": {"w": torch.randn(3, 2, 2)}, "step": torch.arange(3.0)}
    bodies = checkpoint_bodies([{"metrics": {"val_loss": float(k)}} for k in range(3)], stacked)
    for k, parts in enumerate(bodies):
        assert len(parts) == 2 and isinstance(parts[1], memoryview)  # the tensors' bytes, not a copy
        write_checkpoint_body(tmp_path / f"parts-{k}.ckpt", parts)
        write_checkpoint_body(tmp_path / f"joined-{k}.ckpt", b"".join(parts))
        assert (tmp_path / f"parts-{k}.ckpt").read_bytes() == (tmp_path / f"joined-{k}.ckpt").read_bytes()
        loaded = load_checkpoint(tmp_path / f"parts-{k}.ckpt")
        assert torch.equal(loaded["model"]["w"], stacked["model"]["w"][k]) and loaded["metrics"]["val_loss"] == k


def test_bodies_encoded_together_fall_back_to_one_safetensors_call_each_where_the_header_is_not_as_expected(
    monkeypatch,
):  # fmt: skip
    import tasks.storage
    from tasks.storage import checkpoint_bodies, checkpoint_body

    stacked = {"model": {"w": torch.randn(3, 2, 2)}, "step": torch.arange(3.0)}
    own = [{"metrics": {"val_loss": float(k)}} for k in range(3)]
    monkeypatch.setattr(tasks.storage, "_header_layout", lambda body, skeleton: None)  # e.g. a new safetensors
    bodies = checkpoint_bodies(own, stacked)
    for k in range(3):
        alone = {**own[k], "model": {"w": stacked["model"]["w"][k]}, "step": stacked["step"][k]}
        assert b"".join(bodies[k]) == checkpoint_body(alone)


def test_bodies_encoded_together_refuse_what_they_cannot_encode_per_network():
    from tasks.storage import checkpoint_bodies

    with pytest.raises(ValueError, match="hold 3 networks"):
        checkpoint_bodies([{}, {}, {}], {"w": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="no tensors"):
        checkpoint_bodies([{"x": torch.ones(1)}], {"w": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="both"):
        checkpoint_bodies([{"w": 1}], {"w": torch.ones(1, 4)})
    assert checkpoint_bodies([], {"w": torch.ones(0, 4)}) == []


def test_checkpoint_keeps_an_optimizer_state_dict_exactly(tmp_path):
    # Adam's state dict has int keys, tuples, 0-dim tensors; metrics may hold inf. All must come back
    # as they were, or a resumed optimizer would not load or would differ.
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "generator": torch.Generator().manual_seed(3).get_state(),
             "metrics": {"best": float("inf"), "stopped": False, "note": None}, "shapes": [1, (2, 3)]}  # fmt: skip
    save_checkpoint(tmp_path / "iter-00001.ckpt", state)
    loaded = load_checkpoint(tmp_path / "iter-00001.ckpt")
    assert loaded["metrics"] == state["metrics"] and loaded["shapes"] == [1, (2, 3)]
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(loaded["optimizer"]["state"]) == {0, 1}
    for i, saved in state["optimizer"]["state"].items():
        for key, tensor in saved.items():
            back = loaded["optimizer"]["state"][i][key]
            assert torch.equal(back, tensor) and back.shape == tensor.shape
    assert torch.equal(loaded["generator"], state["generator"])
    torch.optim.Adam(model.parameters(), lr=0.1).load_state_dict(loaded["optimizer"])


def test_checkpoints_of_the_first_format_still_load(tmp_path):
    # Runs trained before the safetensors body wrote a torch.save body under format 1's magic.
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 1}, buffer)
    body = buffer.getvalue()
    path = tmp_path / "iter-00001.ckpt"
    path.write_bytes(b"MANYNETS-CKPT-1\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_damaged_checkpoints_are_detected(tmp_path, damage):
    path = tmp_path / "iter-00001.ckpt"
    save_checkpoint(path, {"w": torch.ones(100)})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    else:
        torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_latest_valid_checkpoint_falls_back_past_a_corrupt_one(tmp_path):
    for i in (1, 2, 3):
        save_checkpoint(checkpoint_path(tmp_path, i), {"iteration": i})
    checkpoint_path(tmp_path, 3).write_bytes(b"garbage")
    iteration, state, problems = latest_valid_checkpoint(tmp_path, below=10)
    assert iteration == 2 and state["iteration"] == 2
    assert len(problems) == 1 and "iter-00003" in problems[0]
    assert latest_valid_checkpoint(tmp_path, below=2)[0] == 1
    assert latest_valid_checkpoint(tmp_path / "none", below=5) == (0, None, [])


def test_prune_keeps_the_newest(tmp_path):
    for i in (1, 2, 3, 4):
        save_checkpoint(checkpoint_path(tmp_path, i), {"iteration": i})
    prune_checkpoints(tmp_path, keep=2)
    assert checkpoint_iterations(tmp_path) == [3, 4]


@pytest.mark.parametrize("series_id", ["../x", "a/b", "..", ".", "/etc/passwd", "a\\b", "ünï cødé"])
def test_series_ids_never_escape_the_output_dir(tmp_path, series_id):
    folder = network_dir(tmp_path, series_id)
    assert folder.parent == tmp_path / "networks"
    assert folder.resolve().parent == (tmp_path / "networks").resolve()
    stage_values(tmp_path, series_id, np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(read_values(tmp_path, series_id), [0, 1, 2])


def test_ids_that_sanitise_alike_stay_apart():
    assert safe_name("a/b") != safe_name("a_b")


def test_read_values_explains_a_missing_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="every worker can read"):
        read_values(tmp_path, "missing")


@pytest.mark.parametrize("length", [1, 5, 100_000])
def test_staged_values_read_back_exactly_and_writable(tmp_path, length):
    values = np.random.default_rng(length).normal(size=length).astype(np.float32)
    stage_values(tmp_path, "s", values)
    back = read_values(tmp_path, "s")
    assert back.dtype == np.float32 and back.flags.writeable
    np.testing.assert_array_equal(back, values)


def test_values_files_not_in_the_staged_layout_are_read_by_numpy_and_pickles_refused(tmp_path):
    path = network_dir(tmp_path, "s") / "values.npy"
    path.parent.mkdir(parents=True)
    for other in (np.arange(4.0), np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3, dtype=">f4")):
        np.save(path, other)
        np.testing.assert_array_equal(read_values(tmp_path, "s"), other)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_values(tmp_path, "s")
    path.write_bytes(path.read_bytes()[:60])  # a torn file
    with pytest.raises(ValueError):
        read_values(tmp_path, "s")


def test_run_dir_refuses_another_spec(tmp_path):
    claim_run_dir(tmp_path, {"hidden": 1}, "aaa")
    claim_run_dir(tmp_path, {"hidden": 1}, "aaa")  # same spec: resume
    with pytest.raises(ValueError, match="another model spec.*new output_dir"):
        claim_run_dir(tmp_path, {"hidden": 2}, "bbb")
    assert os.listdir(tmp_path) == ["run.json"]


def test_a_checkpoint_whose_journal_line_was_lost_is_journaled_once_on_resume(tmp_path):
    from tasks.storage import journal_event, journal_recovered_done, read_journal

    journal_event(tmp_path, "done", 1, "w1")
    journal_recovered_done(tmp_path, 1)  # already there: nothing added
    journal_recovered_done(tmp_path, 2)  # killed before its line: added, marked recovered
    journal_recovered_done(tmp_path, 2)
    journal_recovered_done(tmp_path, 0)  # no checkpoint at all
    events = [(e["event"], e["iteration"], e["worker"]) for e in read_journal(tmp_path)]
    assert events == [("done", 1, "w1"), ("done", 2, "recovered")]


def test_a_non_durable_write_is_still_whole_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os

    from tasks.storage import atomic_write_bytes

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    atomic_write_bytes(tmp_path / "a" / "values.npy", b"old")
    assert len(synced) == 2  # the file and its folder
    atomic_write_bytes(tmp_path / "a" / "values.npy", b"new", durable=False)
    assert len(synced) == 2 and (tmp_path / "a" / "values.npy").read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["values.npy"]
