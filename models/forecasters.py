"""The forecasters: a window of past values in, the next `horizon` values out."""

from __future__ import annotations

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


class LSTMForecaster(nn.Module):
    """An LSTM over the window, its last hidden state mapped to the horizon."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=spec.hidden, num_layers=spec.layers, batch_first=True)
        self.head = nn.Linear(spec.hidden, spec.horizon)

    def forward(self, window: torch.Tensor) -> torch.Tensor:  # (batch, window) -> (batch, horizon)
        out, _ = self.lstm(window.unsqueeze(-1))
        return self.head(out[:, -1, :])


_FAMILIES: dict[str, type[nn.Module]] = {"mlp": MLPForecaster, "lstm": LSTMForecaster}


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise `model` exactly as PyTorch's defaults do, but from `generator`.

    Drawing from a per-network generator instead of the global RNG keeps a network's weights a
    function of its own seed, whatever else runs in the same process or thread.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.LSTM):
            bound = 1 / math.sqrt(module.hidden_size)
            for weight in module.parameters():
                nn.init.uniform_(weight, -bound, bound, generator=generator)


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
