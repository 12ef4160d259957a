"""The forecasters: a window of past values in, the next `horizon` values out."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from models.spec import ModelSpec


class MLPForecaster(nn.Module):
    """A plain feed-forward net over the flattened window."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        widths = [spec.window] + [spec.hidden] * spec.layers
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        blocks.append(nn.Linear(widths[-1], spec.horizon))
        self.net = nn.Sequential(*blocks)

    def forward(self, window: torch.Tensor) -> torch.Tensor:  # (batch, window) -> (batch, horizon)
        return self.net(window)


def float32_recurrence(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off around an LSTM/GRU stack on a CPU whose oneDNN has no bfloat16 kernels.

    There, under bf16 autocast, nn.LSTM raises ("could not create a primitive descriptor for the
    LSTM forward propagation primitive"), so the recurrence runs in float32 and the layers around
    it stay in bf16. The stacked models use the same rule, so both strategies compute alike.
    """
    if (device_type == "cpu" and torch.is_autocast_enabled("cpu")
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):  # fmt: skip
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


class _RecurrentForecaster(nn.Module):
    """A recurrent layer stack over the window, its last hidden state mapped to the horizon.

    The stack is stored under the subclass's `name` ("lstm", "gru"): checkpoints and the stacked
    models address its weights by that prefix.
    """

    cell: type[nn.RNNBase]
    name: str

    def __init__(self, spec: ModelSpec):
        super().__init__()
        setattr(self, self.name, self.cell(input_size=1, hidden_size=spec.hidden, num_layers=spec.layers,
                                           batch_first=True))  # fmt: skip
        self.head = nn.Linear(spec.hidden, spec.horizon)

    def forward(self, window: torch.Tensor) -> torch.Tensor:  # (batch, window) -> (batch, horizon)
        with float32_recurrence(window.device.type):
            out, _ = getattr(self, self.name)(window.unsqueeze(-1))
        return self.head(out[:, -1, :])


class LSTMForecaster(_RecurrentForecaster):
    """An LSTM over the window, its last hidden state mapped to the horizon."""

    cell, name = nn.LSTM, "lstm"


class GRUForecaster(_RecurrentForecaster):
    """A GRU over the window, its last hidden state mapped to the horizon."""

    cell, name = nn.GRU, "gru"


class TransformerForecaster(nn.Module):
    """A small Transformer encoder over the window's values; the last position maps to the horizon.

    Each value is embedded by a linear map plus a learned position embedding; post-norm encoder
    layers with a ReLU feed-forward twice the width, no dropout (the fleets are small and the fused
    engine must reproduce a network exactly).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed = nn.Linear(1, spec.hidden)
        self.position = nn.Parameter(torch.zeros(spec.window, spec.hidden))
        layer = nn.TransformerEncoderLayer(
            spec.hidden, spec.heads, dim_feedforward=2 * spec.hidden, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.head = nn.Linear(spec.hidden, spec.horizon)

    def forward(self, window: torch.Tensor) -> torch.Tensor:  # (batch, window) -> (batch, horizon)
        tokens = self.embed(window.unsqueeze(-1)) + self.position
        return self.head(self.encoder(tokens)[:, -1, :])


_FAMILIES: dict[str, type[nn.Module]] = {
    "mlp": MLPForecaster, "lstm": LSTMForecaster, "gru": GRUForecaster, "transformer": TransformerForecaster,
}  # fmt: skip


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise `model` exactly as PyTorch's defaults do, but from `generator`.

    Drawing from a per-network generator instead of the global RNG keeps a network's weights a
    function of its own seed, whatever else runs in the same process or thread. Every parameter is
    written (models may be built on the meta device); the transformer's position embedding, which
    PyTorch has no default for, is drawn from N(0, 0.02).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            bound = 1 / math.sqrt(module.hidden_size)
            for weight in module.parameters():
                nn.init.uniform_(weight, -bound, bound, generator=generator)
        elif isinstance(module, nn.MultiheadAttention):
            # As MultiheadAttention._reset_parameters; out_proj (a Linear) is visited after this.
            nn.init.xavier_uniform_(module.in_proj_weight, generator=generator)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            nn.init.zeros_(module.out_proj.bias)
        if isinstance(module, TransformerForecaster):
            nn.init.normal_(module.position, std=0.02, generator=generator)


def fresh_weights(template: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The parameters `build_model(spec, generator)` would give, drawn by re-initialising `template` (a model of spec).

    Building a module costs ~1.3 ms here, initialising one ~0.1 ms: a caller that needs only the
    weights of many networks (the fused engine) re-initialises one template instead of building each.
    """
    init_weights(template, generator)
    return {name: p.detach().clone() for name, p in template.named_parameters()}


def build_model(spec: ModelSpec, generator: torch.Generator | None = None) -> nn.Module:
    """A fresh forecaster for `spec`, initialised from `generator` when one is given."""
    family = _FAMILIES[spec.architecture]
    if generator is None:
        return family(spec)
    # Built without storage, so PyTorch's default initialisation (overwritten at once) costs nothing.
    with torch.device("meta"):
        model = family(spec)
    model = model.to_empty(device="cpu")
    init_weights(model, generator)
    return model
