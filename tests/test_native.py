"""The compiled stacked LSTM/GRU layer (models/native.py) computes what the eager stacked layer does."""

import pytest
import torch

from models import native
from tests.stacked_pairs import (
    assert_nan_network_kept_apart,
    assert_same_bits_on_one_and_two_threads,
    assert_same_step,
    forward_backward,
    stacked_pair,
)

pytestmark = pytest.mark.skipif(
    native.load() is None, reason="the compiled recurrent layer is switched off or could not be built here"
)


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
# Hidden 16 and 32 run the LSTM's 16-unit slices, 8 and 33 its row-at-a-time cells; batches of 40 leave a
# block of 8 rows.
@pytest.mark.parametrize("k, hidden, layers", [(1, 8, 1), (5, 16, 2), (2, 32, 2), (3, 33, 3)])
def test_compiled_layer_matches_eager(architecture, k, hidden, layers):
    compiled, eager = stacked_pair(architecture, k, hidden, layers)
    torch.manual_seed(100)
    x, target = torch.randn(k, 40, 12) * 2, torch.randn(k, 40, 3)
    assert_same_step(compiled, eager, x, target)


@pytest.mark.parametrize("architecture, hidden", [("lstm", 8), ("lstm", 32), ("gru", 8)])
def test_compiled_layer_keeps_a_nan_network_apart(architecture, hidden):
    """A NaN in one network's input stays in that network's outputs and gradients, as it does eagerly."""
    assert_nan_network_kept_apart(*stacked_pair(architecture, 3, hidden, 2))


@pytest.mark.parametrize("hidden", [12, 32])
def test_lstm_input_layer_matches_the_layer_on_projected_inputs(hidden):
    """The first layer that projects its one input value itself gives LSTMLayer's outputs and gradients,
    the input's included where it is asked for."""
    torch.manual_seed(3)
    k, steps, batch, gates = 3, 9, 21, 4 * hidden
    values = torch.randn(k, steps, batch)
    weights = [torch.randn(k, 1, gates), torch.randn(k, hidden, gates) * 0.3, torch.randn(k, 1, gates),
               torch.randn(k, 1, gates)]  # fmt: skip
    grad_out = torch.randn(k, steps, batch, hidden)

    def run(first_layer):
        leaves = [t.clone().requires_grad_() for t in [values, *weights]]
        first_layer(*leaves).backward(grad_out)
        return [leaf.grad for leaf in leaves]

    expected = run(lambda v, w_ih, *rest: native.LSTMLayer.apply(
        torch.bmm(v.reshape(k, -1, 1), w_ih).view(k, steps, batch, gates), *rest))
    got = run(native.LSTMInputLayer.apply)
    for name, a, b in zip(["values", "weight_ih", "weight_hh", "bias_ih", "bias_hh"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_lstm_step_gives_the_same_bits_on_one_and_two_threads():
    """The bias and input-weight gradients are summed per block of rows, whichever thread runs it."""
    compiled, _ = stacked_pair("lstm", 3, 32, 2)
    torch.manual_seed(4)
    assert_same_bits_on_one_and_two_threads(compiled, torch.randn(3, 40, 12), torch.randn(3, 40, 3))


def test_activations_are_accurate_to_float_precision():
    """exp within 1 ulp over its float range, sigmoid and tanh within 2e-7 of double precision, NaN kept."""
    x = torch.arange(-87.0, 88.0, 1e-4, dtype=torch.float64).float()
    exp, sigmoid, tanh = native.load().activations(x)
    exact = x.double()
    ulp = torch.abs(exp.view(torch.int32).long() - exact.exp().float().view(torch.int32).long())
    assert ulp.max() <= 1
    assert torch.abs(sigmoid.double() - torch.sigmoid(exact)).max() < 2e-7
    assert torch.abs(tanh.double() - torch.tanh(exact)).max() < 2e-7
    assert all(torch.isnan(out).all() for out in native.load().activations(torch.tensor([float("nan")])))


@pytest.mark.parametrize("hidden", [8, 16])
def test_saturated_gates_stay_finite(hidden):
    """exp_approx clamps: pre-activations far beyond float range give sigmoid 0/1 and tanh -1/1, not NaN."""
    compiled, eager = stacked_pair("lstm", 2, hidden, 1)
    x = torch.tensor([1e6, -1e6, 3e4, -3e4]).repeat(2, 4, 3)
    out_c, _ = forward_backward(compiled, x, torch.zeros(2, 4, 3))
    out_e, _ = forward_backward(eager, x, torch.zeros(2, 4, 3))
    assert torch.isfinite(out_c).all()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_the_compiled_lstm_is_refused():
    """Its backward overwrites the saved gates with their gradients: a retained graph must not be reused."""
    compiled, _ = stacked_pair("lstm", 2, 8, 1)
    loss = compiled(torch.randn(2, 4, 12)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.load() is None and not native.usable(torch.zeros(1))
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.usable(torch.zeros(1)) and not native.usable(torch.zeros(1, dtype=torch.float64))


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """A process killed mid-build leaves PyTorch's lock file, on which every later build would wait forever."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    native._clear_stale_lock("stale")
    lock = next(tmp_path.rglob("stale")) / "lock"
    lock.touch()
    native._clear_stale_lock("stale")
    assert lock.exists()  # a build may be running
    old = time.time() - native.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    native._clear_stale_lock("stale")
    assert not lock.exists()
