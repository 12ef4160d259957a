"""K same-shaped MLP forecasters held as one module: weights stacked on a leading dimension.

The single-network `MLPForecaster` stays the source of truth: a StackedMLP is built from K of them
(so initialisation is exactly theirs) and gives each network's weights back in the single-network
state-dict layout (so checkpoints do not depend on how a network was trained).
"""

from __future__ import annotations

import torch
from torch import nn

from models.forecasters import MLPForecaster


def _linears(model: MLPForecaster) -> list[nn.Linear]:
    return [m for m in model.net if isinstance(m, nn.Linear)]


class StackedMLP(nn.Module):
    """K MLPs run as batched matrix products: input (K, batch, window) -> output (K, batch, horizon).

    Parameters are ordered weight0, bias0, weight1, bias1, ... exactly like one MLPForecaster's, with
    each weight stored transposed, (K, fan_in, fan_out), so a layer is one `baddbmm`.
    """

    def __init__(self, networks: list[MLPForecaster]):
        super().__init__()
        layers = list(zip(*(_linears(n) for n in networks)))  # per layer: that layer of every network
        self.params = nn.ParameterList()
        for layer in layers:
            self.params.append(nn.Parameter(torch.stack([l.weight.detach().T for l in layer]).contiguous()))
            self.params.append(nn.Parameter(torch.stack([l.bias.detach() for l in layer]).unsqueeze(1)))
        self.keys = [f"net.{2 * i}.{kind}" for i in range(len(layers)) for kind in ("weight", "bias")]

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Run networks 0..upto-1 (all by default) on x of shape (upto, batch, window)."""
        last = len(self.params) // 2 - 1
        for i in range(last + 1):
            x = torch.baddbmm(self.params[2 * i + 1][:upto], x, self.params[2 * i][:upto])
            if i < last:
                x = torch.relu(x)
        return x

    def to_single(self, tensor: torch.Tensor, index: int, k: int) -> torch.Tensor:
        """Network k's slice of stacked tensor number `index` (a parameter or its optimizer state)."""
        piece = tensor[k]
        return piece.T.contiguous() if index % 2 == 0 else piece[0].clone()

    def from_singles(self, index: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Stack the networks' tensors for parameter number `index` in this module's layout."""
        if index % 2 == 0:
            return torch.stack([p.T for p in pieces]).contiguous()
        return torch.stack(pieces).unsqueeze(1)

    def state_dict_of(self, k: int) -> dict[str, torch.Tensor]:
        """Network k's weights as an MLPForecaster state dict."""
        return {key: self.to_single(p.detach(), i, k).cpu() for i, (key, p) in enumerate(zip(self.keys, self.params))}


class StackedAdam:
    """Adam over stacked parameters with a step count per network and a mask of who steps.

    Adam is elementwise, so on stacked tensors each network's update is its own; what is not, the
    step count behind the bias correction, is kept per network. A network masked out of a step
    (it has no batch left this epoch, or its loss blew up) is left exactly as it was. The
    arithmetic follows torch.optim.Adam's single-tensor path, so a network trained here matches
    one trained alone within float tolerance.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        k = self.params[0].shape[0]
        self.steps = [torch.zeros(k, dtype=torch.float64) for _ in self.params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """Update networks 0..len(active)-1 where `active` (bool) is True; later networks are untouched."""
        upto = active.shape[0]
        for p, m, v, steps in zip(self.params, self.exp_avgs, self.exp_avg_sqs, self.steps):
            p, m, v, steps, grad = p[:upto], m[:upto], v[:upto], steps[:upto], p.grad[:upto]
            shape = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(shape)
            steps += active.to(steps.dtype).cpu()
            bias1 = (1 - self.beta1 ** steps).clamp(min=1e-300)
            bias2_sqrt = (1 - self.beta2 ** steps).clamp(min=1e-300).sqrt()
            step_size = (self.lr / bias1).to(p.dtype).to(p.device).view(shape)
            new_m = m.lerp(grad, 1 - self.beta1)
            new_v = v.mul(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (new_v.sqrt() / bias2_sqrt.to(p.dtype).to(p.device).view(shape)).add_(self.eps)
            m.copy_(torch.where(on, new_m, m))
            v.copy_(torch.where(on, new_v, v))
            p.copy_(torch.where(on, p - step_size * (new_m / denom), p))
