"""The forecasters: a window of past values in, the next `horizon` values out."""

from __future__ import annotations

import contextlib
import math
import weakref

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


# One step of initialisation: (parameter name, tensor method, its arguments); uniform_ and normal_
# draw from the network's generator, fill_ does not.
InitStep = tuple[str, str, tuple[float, ...]]


def init_plan(model: nn.Module) -> list[InitStep]:
    """What init_weights writes into `model`, step by step in its order (later steps overwrite earlier ones).

    PyTorch's default initialisation per module type, its bounds computed as torch.nn.init does;
    the transformer's position embedding, which PyTorch has no default for, is drawn from N(0, 0.02).
    Only shapes are read, so `model` may be on the meta device.
    """
    steps: list[InitStep] = []
    modules = list(model.named_modules())
    for prefix, module in modules:
        at = f"{prefix}." if prefix else ""
        if isinstance(module, nn.Linear):
            fan_in = nn.init._calculate_correct_fan(module.weight, "fan_in")
            bound = math.sqrt(3.0) * (nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in))
            steps.append((f"{at}weight", "uniform_", (-bound, bound)))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                steps.append((f"{at}bias", "uniform_", (-bound, bound)))
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            bound = 1 / math.sqrt(module.hidden_size)
            steps += [(f"{at}{name}", "uniform_", (-bound, bound)) for name, _ in module.named_parameters()]
        elif isinstance(module, nn.MultiheadAttention):
            # As MultiheadAttention._reset_parameters; out_proj (a Linear) is visited after this.
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.in_proj_weight)
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
            steps += [(f"{at}in_proj_weight", "uniform_", (-bound, bound)), (f"{at}in_proj_bias", "fill_", (0.0,))]
        elif isinstance(module, nn.LayerNorm):
            steps += [(f"{at}weight", "fill_", (1.0,)), (f"{at}bias", "fill_", (0.0,))]
    for prefix, module in modules:
        at = f"{prefix}." if prefix else ""
        if isinstance(module, nn.MultiheadAttention):
            steps.append((f"{at}out_proj.bias", "fill_", (0.0,)))
        if isinstance(module, TransformerForecaster):
            steps.append((f"{at}position", "normal_", (0.0, 0.02)))
    written = {name for name, _, _ in steps}
    unwritten = [name for name, _ in model.named_parameters() if name not in written]
    if unwritten:
        raise TypeError(f"no default initialisation for parameter(s) {', '.join(unwritten)} of {type(model).__name__}")
    return steps


def _run_plan(plan: list[InitStep], tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    for name, method, args in plan:
        if method == "fill_":
            tensors[name].fill_(*args)
        else:
            getattr(tensors[name], method)(*args, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise `model` exactly as PyTorch's defaults do (init_plan), but from `generator`.

    Drawing from a per-network generator instead of the global RNG keeps a network's weights a
    function of its own seed, whatever else runs in the same process or thread. Every parameter is
    written (models may be built on the meta device).
    """
    _run_plan(init_plan(model), dict(model.named_parameters()), generator)


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[list[InitStep], list[tuple[str, torch.Size]]]] = (
    weakref.WeakKeyDictionary()
)


def fresh_weights(template: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The parameters `build_model(spec, generator)` would give, drawn for a model like `template` (a model of spec).

    Building a module costs ~1.3 ms here: a caller that needs only the weights of many networks
    (the fused engine) draws them here, the template's init plan computed once and replayed into
    new tensors (no module walk per network; `template` itself is not touched).
    """
    if template not in _PLANS:
        _PLANS[template] = (init_plan(template), [(name, p.shape) for name, p in template.named_parameters()])
    plan, shapes = _PLANS[template]
    tensors = {name: torch.empty(shape) for name, shape in shapes}
    _run_plan(plan, tensors, generator)
    return tensors


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
