"""K same-shaped forecasters held as one module: weights stacked on a leading dimension.

The single-network forecasters stay the source of truth: a stacked model is built from K of them
(so initialisation is exactly theirs) and gives each network's weights back in the single-network
state-dict layout (so checkpoints do not depend on how a network was trained).

Every layer is a batched matrix product over the K networks, written by hand: on this CPU
`torch.func.vmap` over the single modules has no batching rule for `aten::lstm`/`aten::gru` at
all, and over a Transformer encoder it ran 5.6x slower than a plain loop over 64 networks
(`python -m benchmarks.stacking`, benchmarks/results/stacking_probe.json). Matrices are stored
transposed, (K, fan_in, fan_out), and biases as (K, 1, n), so each layer is one `baddbmm`.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from models.forecasters import float32_recurrence


class StackedNetworks(nn.Module):
    """Base: the parameters of K single networks, stacked, in their single `named_parameters` order.

    Subclasses define `forward(x, upto)`: networks 0..upto-1 (all by default) on x of shape
    (upto, batch, window), returning (upto, batch, horizon). Running a prefix lets a caller skip
    networks that have no batch left, without copying weights.
    """

    def __init__(self, networks: list[nn.Module | dict[str, torch.Tensor]], template: nn.Module | None = None):
        """Stack `networks`: single modules, or their parameter dicts with a `template` module of the same spec."""
        super().__init__()
        named = [n if isinstance(n, dict) else dict(n.named_parameters()) for n in networks]
        template = template if template is not None else networks[0]
        self.keys = [key for key, _ in template.named_parameters()]
        self.index = {key: i for i, key in enumerate(self.keys)}
        # Per parameter: "row" (a bias, stored (K, 1, n)), "T" (a weight matrix, stored transposed) or
        # "same" (stored as is, e.g. a position table).
        self.layouts = []
        for key, tensor in template.named_parameters():
            self.layouts.append("row" if tensor.dim() == 1 else "T" if tensor.dim() == 2 and "weight" in key else "same")
        self.params = nn.ParameterList(
            nn.Parameter(self.from_singles(i, [n[key].detach() for n in named])) for i, key in enumerate(self.keys)
        )

    def p(self, key: str, upto: int | None) -> torch.Tensor:
        """The stacked parameter `key` of networks 0..upto-1."""
        return self.params[self.index[key]][:upto]

    def to_single(self, tensor: torch.Tensor, index: int, k: int) -> torch.Tensor:
        """Network k's slice of stacked tensor number `index` (a parameter or its optimizer state)."""
        piece = tensor[k]
        layout = self.layouts[index]
        return piece[0].clone() if layout == "row" else piece.T.contiguous() if layout == "T" else piece.clone()

    def from_singles(self, index: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Stack the networks' tensors for parameter number `index` in this module's layout."""
        layout = self.layouts[index]
        if layout == "row":
            return torch.stack(pieces).unsqueeze(1)
        return torch.stack([p.T for p in pieces] if layout == "T" else pieces).contiguous()

    def to_singles(self, tensor: torch.Tensor, index: int) -> list[torch.Tensor]:
        """Every network's slice of stacked tensor number `index`, on the CPU, each in its own storage.

        One layout change for the whole stack, then one small copy per network (a checkpoint of a
        view would carry the whole stack): ~20x cheaper than K calls of `to_single`.
        """
        layout = self.layouts[index]
        whole = tensor.detach()
        whole = whole[:, 0] if layout == "row" else whole.transpose(1, 2) if layout == "T" else whole
        return [piece.clone() for piece in whole.cpu().contiguous().unbind(0)]

    def state_dict_of(self, k: int) -> dict[str, torch.Tensor]:
        """Network k's weights as its single forecaster's state dict."""
        return {key: self.to_single(p.detach(), i, k).cpu() for i, (key, p) in enumerate(zip(self.keys, self.params))}

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every network's weights as its single forecaster's state dict (state_dict_of for all k at once)."""
        columns = [self.to_singles(p, i) for i, p in enumerate(self.params)]
        return [dict(zip(self.keys, row)) for row in zip(*columns)]

    def linear(self, x: torch.Tensor, prefix: str, upto: int | None) -> torch.Tensor:
        """The stacked nn.Linear `prefix` applied to x of shape (upto, rows, fan_in)."""
        return torch.baddbmm(self.p(f"{prefix}.bias", upto), x, self.p(f"{prefix}.weight", upto))


class StackedMLP(StackedNetworks):
    """K MLPForecasters: input (K, batch, window) -> output (K, batch, horizon)."""

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        prefixes = [key[: -len(".weight")] for key in self.keys if key.endswith(".weight")]
        for i, prefix in enumerate(prefixes):
            x = self.linear(x, prefix, upto)
            if i < len(prefixes) - 1:
                x = torch.relu(x)
        return x


class _StackedRecurrent(StackedNetworks):
    """Shared by LSTM and GRU: input projections of a whole layer in one product, then the steps."""

    module = ""  # the single forecaster's attribute holding its nn.LSTM / nn.GRU

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        k, batch, steps = x.shape
        layers = sum(key.startswith(f"{self.module}.weight_ih_l") for key in self.keys)
        seq = x.reshape(k, batch * steps, 1)  # (K, batch*time, features), batch-major like batch_first
        with float32_recurrence(x.device.type):
            outputs = self._layers(seq, k, batch, steps, layers, upto)
        return self.linear(outputs[-1], "head", upto)

    def _layers(self, seq, k: int, batch: int, steps: int, layers: int, upto: int | None) -> list[torch.Tensor]:
        """The last layer's hidden state at every step, (K, batch, hidden) each."""
        for layer in range(layers):
            suffix = f"_l{layer}"
            # All time steps' input projections at once; time-major so each step reads a contiguous block.
            projected = torch.baddbmm(self.p(f"{self.module}.bias_ih{suffix}", upto), seq,
                                      self.p(f"{self.module}.weight_ih{suffix}", upto))  # fmt: skip
            projected = projected.view(k, batch, steps, -1).transpose(0, 2).transpose(1, 2).contiguous()
            outputs = self.run_layer(projected, self.p(f"{self.module}.weight_hh{suffix}", upto),
                                     self.p(f"{self.module}.bias_hh{suffix}", upto))  # fmt: skip
            if layer < layers - 1:
                seq = torch.stack(outputs, dim=2).reshape(k, batch * steps, -1)
        return outputs

    def run_layer(self, projected, weight_hh, bias_hh) -> list[torch.Tensor]:
        """Every step's hidden state (K, batch, hidden) given projected inputs (time, K, batch, gates)."""
        raise NotImplementedError


class StackedLSTM(_StackedRecurrent):
    """K LSTMForecasters (PyTorch's gate order i, f, g, o; zero initial state)."""

    module = "lstm"

    def run_layer(self, projected, weight_hh, bias_hh) -> list[torch.Tensor]:
        h = c = None
        outputs = []
        # unbind/chunk, not indexing: their backward assembles one gradient, where each slice's
        # backward would zero-fill and copy a whole-size tensor per step.
        for step in projected.unbind(0):
            gates = step + bias_hh if h is None else torch.baddbmm(step + bias_hh, h, weight_hh)
            i, f, g, o = gates.chunk(4, dim=-1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = i * g if c is None else torch.addcmul(f * c, i, g)
            h = o * torch.tanh(c)
            outputs.append(h)
        return outputs


class StackedGRU(_StackedRecurrent):
    """K GRUForecasters (PyTorch's gate order r, z, n; zero initial state)."""

    module = "gru"

    def run_layer(self, projected, weight_hh, bias_hh) -> list[torch.Tensor]:
        h = None
        outputs = []
        for step in projected.unbind(0):
            recurrent = bias_hh.expand(-1, step.shape[1], -1) if h is None else torch.baddbmm(bias_hh, h, weight_hh)
            step_r, step_z, step_n = step.chunk(3, dim=-1)
            rec_r, rec_z, rec_n = recurrent.chunk(3, dim=-1)
            r, z = torch.sigmoid(step_r + rec_r), torch.sigmoid(step_z + rec_z)
            n = torch.tanh(torch.addcmul(step_n, r, rec_n))
            h = n - z * n if h is None else torch.lerp(n, h, z)  # (1 - z) * n + z * h
            outputs.append(h)
        return outputs


class StackedTransformer(StackedNetworks):
    """K TransformerForecasters (post-norm encoder layers, ReLU feed-forward, no dropout)."""

    def __init__(self, networks: list[nn.Module | dict[str, torch.Tensor]], template: nn.Module | None = None):
        super().__init__(networks, template)
        first = template if template is not None else networks[0]
        self.heads = first.encoder.layers[0].self_attn.num_heads
        self.eps = first.encoder.layers[0].norm1.eps

    def _norm(self, x: torch.Tensor, prefix: str, upto: int | None) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.p(f"{prefix}.bias", upto), normed, self.p(f"{prefix}.weight", upto))

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        k, batch, steps = x.shape
        tokens = self.linear(x.reshape(k, batch * steps, 1), "embed", upto).view(k, batch, steps, -1)
        z = (tokens + self.p("position", upto).unsqueeze(1)).reshape(k, batch * steps, -1)
        width = z.shape[-1]
        head_dim = width // self.heads
        layers = sum(key.endswith("self_attn.in_proj_weight") for key in self.keys)
        for layer in range(layers):
            at = f"encoder.layers.{layer}"
            qkv = torch.baddbmm(self.p(f"{at}.self_attn.in_proj_bias", upto), z,
                                self.p(f"{at}.self_attn.in_proj_weight", upto))  # fmt: skip
            # (K, batch, time, 3, heads, head_dim) -> three (K*batch, heads, time, head_dim)
            q, key, value = qkv.view(k * batch, steps, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(q, key, value)
            attended = attended.transpose(1, 2).reshape(k, batch * steps, width)
            z = self._norm(z + self.linear(attended, f"{at}.self_attn.out_proj", upto), f"{at}.norm1", upto)
            inner = torch.relu(self.linear(z, f"{at}.linear1", upto))
            z = self._norm(z + self.linear(inner, f"{at}.linear2", upto), f"{at}.norm2", upto)
        last = z.view(k, batch, steps, width)[:, :, -1, :]
        return self.linear(last, "head", upto)


STACKED: dict[str, type[StackedNetworks]] = {
    "mlp": StackedMLP, "lstm": StackedLSTM, "gru": StackedGRU, "transformer": StackedTransformer,
}  # fmt: skip


def stack(
    architecture: str, networks: list[nn.Module | dict[str, torch.Tensor]], template: nn.Module | None = None
) -> StackedNetworks:  # fmt: skip
    """The stacked version of `networks` (all of `architecture` and one spec): modules, or parameter
    dicts (state-dict names) with a `template` module of that spec giving their order and shapes."""
    return STACKED[architecture](networks, template)


class StackedAdam:
    """Adam over stacked parameters with a step count and learning rate per network, and a mask of who steps.

    Adam is elementwise, so on stacked tensors each network's update is its own; what is not, the
    step count behind the bias correction and the learning rate (schedules), is kept per network.
    A network masked out of a step (it has no batch left this epoch, its loss blew up, or it
    stopped early) is left exactly as it was. The arithmetic follows torch.optim.Adam's
    single-tensor path, so a network trained here matches one trained alone within float tolerance.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        (self.beta1, self.beta2), self.eps = betas, eps
        k = self.params[0].shape[0]
        self.lr = torch.full((k,), float(lr), dtype=torch.float64)
        self.steps = [torch.zeros(k, dtype=torch.float64) for _ in self.params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, upto: int) -> None:
        """Scale each network's gradient to global L2 norm <= max_norm, as clip_grad_norm_ does alone."""
        grads = [p.grad[:upto] for p in self.params]
        norms = torch.stack([g.reshape(upto, -1).double().pow(2).sum(dim=1) for g in grads]).sum(dim=0).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1)))

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """Update networks 0..len(active)-1 where `active` (bool) is True; later networks are untouched."""
        upto = active.shape[0]
        lr = self.lr[:upto]
        everyone = bool(active.all())
        for p, m, v, steps in zip(self.params, self.exp_avgs, self.exp_avg_sqs, self.steps):
            p, m, v, steps, grad = p[:upto], m[:upto], v[:upto], steps[:upto], p.grad[:upto]
            shape = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(shape)
            steps += active.to(steps.dtype).cpu()
            bias1 = (1 - self.beta1**steps).clamp(min=1e-300)
            bias2_sqrt = (1 - self.beta2**steps).clamp(min=1e-300).sqrt()
            step_size = (lr / bias1).to(p.dtype).to(p.device).view(shape)
            if everyone:  # the usual step: in place, no masked copies (half the time of the masked path)
                m.lerp_(grad, 1 - self.beta1)
                v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
                denom = (v.sqrt() / bias2_sqrt.to(p.dtype).to(p.device).view(shape)).add_(self.eps)
                p.sub_(step_size * (m / denom))
                continue
            new_m = m.lerp(grad, 1 - self.beta1)
            new_v = v.mul(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (new_v.sqrt() / bias2_sqrt.to(p.dtype).to(p.device).view(shape)).add_(self.eps)
            m.copy_(torch.where(on, new_m, m))
            v.copy_(torch.where(on, new_v, v))
            p.copy_(torch.where(on, p - step_size * (new_m / denom), p))


def peak_flops(device: str = "cpu", size: int = 256, batch: int = 64, repeats: int = 10) -> float:
    """Measured multiply-add throughput (FLOP/s, 2 per multiply-add) of float32 `bmm` on `device`."""
    a = torch.randn(batch, size, size, device=device)
    b = torch.randn(batch, size, size, device=device)
    torch.bmm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.bmm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * batch * size**3 / best
