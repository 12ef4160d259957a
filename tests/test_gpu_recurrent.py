"""The GPU's stacked LSTM layer (models/gpu_recurrent.py) computes what the eager stacked layer does.

On a GPU (MANYNETS_TEST_DEVICE=cuda) its Triton kernels run there; elsewhere in Triton's CPU
interpreter (tests/conftest.py chooses it), so the kernels' arithmetic is checked on every run.
"""

import os
import types

import pytest
import torch

from models import gpu_recurrent, native
from models.stacked import StackedLSTM
from tests.stacked_pairs import assert_nan_network_kept_apart, forward_backward, stacked_pair

DEVICE = os.environ.get("MANYNETS_TEST_DEVICE", "cpu")
pytestmark = [
    pytest.mark.skipif(not gpu_recurrent.available(), reason="Triton is not installed"),
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton's interpreter was not chosen before Triton was imported"),  # fmt: skip
]


@pytest.fixture(autouse=True)
def gpu_layer_on_this_device(monkeypatch):
    """The GPU layer wherever these tests run: on a CPU it stands in for the compiled C++ layer."""
    monkeypatch.setattr(native, "usable", lambda x: False)
    monkeypatch.setattr(gpu_recurrent, "usable", lambda x, hidden=None: x.dtype == torch.float32)


def lstm_pair(k: int, hidden: int, layers: int):
    """The same K LSTM networks stacked twice on DEVICE: one running the GPU layer, one the eager steps."""
    return stacked_pair("lstm", k, hidden, layers, DEVICE)


# Hidden sizes below, at and past a power of two (the kernels mask the columns past H) and batches
# whose K x B rows do not fill the last program.
@pytest.mark.parametrize("k, hidden, layers, batch", [(1, 8, 1, 40), (5, 16, 2, 37), (3, 33, 3, 40), (2, 32, 2, 64)])
def test_gpu_layer_matches_eager(k, hidden, layers, batch):
    layered, eager = lstm_pair(k, hidden, layers)
    assert layered.layer_function(torch.zeros(1, device=DEVICE)) is gpu_recurrent.LSTMLayer
    torch.manual_seed(100)
    x, target = (torch.randn(k, batch, 12) * 2).to(DEVICE), torch.randn(k, batch, 3).to(DEVICE)
    out_g, grads_g = forward_backward(layered, x, target)
    out_e, grads_e = forward_backward(eager, x, target)
    torch.testing.assert_close(out_g, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_g, grads_e, rtol=1e-4, atol=1e-6)


def test_gpu_layer_keeps_a_nan_network_apart():
    """A NaN in one network's input stays in that network's outputs and gradients, as it does eagerly."""
    assert_nan_network_kept_apart(*lstm_pair(3, 8, 2), device=DEVICE)


def test_a_prefix_of_the_stack_runs_alone():
    """upto=k trains the first k networks only (the fused loop's shrinking steps): their outputs are unchanged."""
    layered, _ = lstm_pair(4, 8, 2)
    x = torch.randn(4, 16, 12).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(layered(x[:2], upto=2), layered(x)[:2], rtol=1e-6, atol=1e-7)


def test_a_second_backward_through_the_gpu_layer_is_refused():
    layered, _ = lstm_pair(2, 8, 1)
    loss = layered(torch.randn(2, 4, 12).to(DEVICE)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_the_gpu_layer_is_chosen_on_cuda_within_its_width_and_never_where_switched_off_or_broken(monkeypatch):
    monkeypatch.undo()
    assert StackedLSTM.gpu_layer is gpu_recurrent.LSTMLayer
    assert not gpu_recurrent.usable(torch.zeros(2, 3))  # a CPU runs models/native.py's layer or the eager steps
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # no GPU needed to ask
    assert gpu_recurrent.usable(on_cuda) and gpu_recurrent.usable(on_cuda, gpu_recurrent.MAX_HIDDEN)
    assert not gpu_recurrent.usable(on_cuda, gpu_recurrent.MAX_HIDDEN + 1)
    assert not gpu_recurrent.usable(types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16))
    monkeypatch.setattr(gpu_recurrent, "_broken", ["CompilationError"])
    assert not gpu_recurrent.usable(on_cuda)
    monkeypatch.setattr(gpu_recurrent, "_broken", [])
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not gpu_recurrent.usable(on_cuda)


def test_kernels_that_fail_in_the_warm_up_leave_the_process_on_the_eager_steps(monkeypatch, caplog):
    def fail(*args):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(gpu_recurrent, "_broken", [])
    monkeypatch.setattr(gpu_recurrent.LSTMLayer, "apply", fail)
    gpu_recurrent.warm_up(DEVICE)  # the fixture's `usable` lets it try here too
    # What `usable` then reads: no GPU layer in this process (the test above checks that reading).
    assert gpu_recurrent._broken == ["RuntimeError: out of resource: shared memory"]
    assert "shared memory" in caplog.text and "eager steps" in caplog.text
