"""Helpers for the compiled recurrent layers' tests (test_native, test_gpu_recurrent): the same networks
stacked twice, one running a compiled layer and one the eager steps, and one training step of each."""

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
