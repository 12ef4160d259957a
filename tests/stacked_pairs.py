"""Helpers for the compiled layers' tests (test_native, test_native_mlp, test_native_transformer,
test_gpu_recurrent): the same networks stacked twice, one running its compiled code and one the eager layers,
one training step of each, and the same step on 1 and 2 threads."""

import torch

from models import ModelSpec, build_model
from models.stacked import stack


def stacked_pair(architecture: str, k: int, hidden: int, layers: int, device: str = "cpu"):
    """The same K networks stacked twice on `device`: one running its compiled layer, one the eager steps."""
    spec = ModelSpec(architecture=architecture, hidden=hidden, layers=layers, window=12, horizon=3)
    networks = []
    for seed in range(k):
        torch.manual_seed(seed)
        networks.append(build_model(spec))
    compiled, eager = stack(architecture, networks).to(device), stack(architecture, networks).to(device)
    eager.use_compiled = False
    return compiled, eager


def forward_backward(model, x, target):
    """Outputs and the (K, P) gradients of one MSE step, on the CPU."""
    model.grads.zero_()
    out = model(x)
    ((out - target) ** 2).mean(dim=(1, 2)).sum().backward()
    return out.detach().cpu(), model.grads.detach().cpu()


def assert_same_step(compiled, eager, x, target, equal_nan: bool = False):
    """One MSE step of both stacks gives the same outputs and (K, P) gradients within float tolerance.

    Returns the compiled stack's (outputs, gradients), on the CPU."""
    out_c, grads_c = forward_backward(compiled, x, target)
    out_e, grads_e = forward_backward(eager, x, target)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6, equal_nan=equal_nan)
    torch.testing.assert_close(grads_c, grads_e, rtol=1e-4, atol=1e-6, equal_nan=equal_nan)
    return out_c, grads_c


def assert_nan_network_kept_apart(compiled, eager, k: int = 3, device: str = "cpu"):
    """A NaN in network 1's input turns only its outputs and gradients NaN, in both stacks alike.

    Returns the step's (x, target), on `device`."""
    x, target = torch.randn(k, 16, 12), torch.randn(k, 16, 3)
    x[1, 4, 7] = float("nan")
    x, target = x.to(device), target.to(device)
    out_c, grads_c = assert_same_step(compiled, eager, x, target, equal_nan=True)
    others = [n for n in range(k) if n != 1]
    assert torch.isnan(out_c[1, 4]).all() and torch.isnan(grads_c[1]).all()
    assert not torch.isnan(out_c[others]).any() and not torch.isnan(grads_c[others]).any()
    return x, target


def assert_same_bits_on_one_and_two_threads(model, x, target):
    """One MSE step of `model` on 1 and on 2 of ATen's threads gives bitwise the same outputs and gradients."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward_backward(model, x, target)
        torch.set_num_threads(2)
        two = forward_backward(model, x, target)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
