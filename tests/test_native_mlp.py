"""The compiled stacked MLP (models/csrc/mlp_cpu.cpp) computes what the eager stacked MLP does."""

import pytest
import torch

from models import native
from tasks.fused import _masked_mse
from tests.stacked_pairs import assert_nan_network_kept_apart, assert_same_step, forward_backward, stacked_pair

pytestmark = pytest.mark.skipif(
    native.load() is None, reason="the compiled stacked layers are switched off or could not be built here"
)


def _data(k, batch, seed=100):
    torch.manual_seed(seed)
    return torch.randn(k, batch, 12) * 2, torch.randn(k, batch, 3)


# 70 wide: one column block of 64 and one of 16 (padded); 13 rows: a block of 8 and 5 single rows.
@pytest.mark.parametrize("k, hidden, layers, batch", [(1, 8, 1, 40), (5, 32, 2, 13), (3, 33, 3, 40), (2, 70, 2, 9)])
def test_forward_and_backward_match_eager(k, hidden, layers, batch):
    compiled, eager = stacked_pair("mlp", k, hidden, layers)
    x, target = _data(k, batch)
    assert_same_step(compiled, eager, x, target)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:1], 1), eager(x[:1], 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("upto", [5, 3])
def test_mse_step_matches_autograd_on_the_masked_loss(full, upto):
    """Losses and gradients of the compiled step equal the engine's masked MSE through autograd; a network
    with no real row gets neither loss nor gradient, and networks past `upto` are left alone."""
    compiled, eager = stacked_pair("mlp", 5, 32, 2)
    x, target = _data(5, 21)
    real = torch.rand(5, 21) > 0.4
    real[1] = False
    eager.grads.zero_()
    losses_e = _masked_mse(eager(x[:upto], upto), target[:upto], real[:upto], full)
    losses_e.sum().backward()
    compiled.grads.fill_(0.5)  # the step adds into what is there
    losses_c = compiled.mse_step(x[:upto], target[:upto], real[:upto], full, upto)
    torch.testing.assert_close(losses_c, losses_e.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled.grads[:upto] - 0.5, eager.grads[:upto], rtol=1e-4, atol=1e-6)
    assert (compiled.grads[upto:] == 0.5).all()
    if not full:
        assert losses_c[1] == 0 and (compiled.grads[1] == 0.5).all()


def test_mse_step_is_left_to_autograd_where_the_stack_runs_eagerly():
    compiled, eager = stacked_pair("mlp", 2, 8, 1)
    x, target = _data(2, 8)
    assert eager.mse_step(x, target, None, True) is None
    with torch.no_grad():
        assert compiled.mse_step(x, target, None, True) is None
    wide, _ = stacked_pair("mlp", 2, native.MLP_MAX_WIDTH + 1, 1)  # wider, the eager products are faster
    assert wide.mse_step(x, target, None, True) is None and not wide.compiled(x)
    assert stacked_pair("mlp", 2, native.MLP_MAX_WIDTH, 1)[0].compiled(x)


def test_a_nan_network_stays_apart():
    compiled, eager = stacked_pair("mlp", 3, 16, 2)
    x, target = assert_nan_network_kept_apart(compiled, eager)
    compiled.grads.zero_()
    losses = compiled.mse_step(x, target, None, True)
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    assert torch.isfinite(compiled.grads[[0, 2]]).all()


def test_gradients_reach_parameters_outside_a_stack():
    """Parameters that are not views of a stack get their gradients from autograd, as any module's."""
    compiled, eager = stacked_pair("mlp", 2, 16, 2)
    x, target = _data(2, 10)
    params = [compiled.view(compiled.weights, i).detach().clone().requires_grad_() for i in range(len(compiled.keys))]
    ((native.mlp(x, params) - target) ** 2).mean(dim=(1, 2)).sum().backward()
    _, grads_e = forward_backward(eager, x, target)
    got = torch.cat([p.grad.reshape(2, -1) for p in params], dim=1)
    torch.testing.assert_close(got, grads_e, rtol=1e-4, atol=1e-6)


def test_an_input_that_needs_a_gradient_runs_eagerly():
    compiled, eager = stacked_pair("mlp", 2, 8, 1)
    x, target = _data(2, 6)
    grads = []
    for model in (compiled, eager):
        xs = x.clone().requires_grad_()
        model.grads.zero_()
        ((model(xs) - target) ** 2).sum().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="input's gradient"):
        native.mlp(x.clone().requires_grad_(), [p for p in compiled.bind().values()])


def test_bad_shapes_are_refused_with_a_message():
    compiled, _ = stacked_pair("mlp", 2, 8, 1)
    params = [compiled.view(compiled.weights, i) for i in range(len(compiled.keys))]
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU tensor \(K, batch, 12\)"):
        native.load().mlp_forward(torch.zeros(2, 4, 11), params, False)
    with pytest.raises(RuntimeError, match="target"):
        native.load().mlp_mse_step(torch.zeros(2, 4, 12), torch.zeros(2, 4, 2), torch.zeros(0), True, params,
                                   [compiled.view(compiled.grads, i) for i in range(len(compiled.keys))])  # fmt: skip


def test_the_step_is_the_same_on_every_thread_count():
    """Networks are split across ATen's threads and never share a buffer: 2 threads give 1 thread's bits."""
    compiled, _ = stacked_pair("mlp", 7, 32, 2)
    x, target = _data(7, 33)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            compiled.grads.zero_()
            results.append((compiled.mse_step(x, target, None, True), compiled.grads.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
