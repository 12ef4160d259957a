"""K same-shaped forecasters held as one module: weights stacked on a leading dimension.

The single-network forecasters stay the source of truth: a stacked model is built from K of them
(so initialisation is exactly theirs) and gives each network's weights back in the single-network
state-dict layout (so checkpoints do not depend on how a network was trained).

Every layer is a batched matrix product over the K networks, written by hand: on this CPU
`torch.func.vmap` over the single modules has no batching rule for `aten::lstm`/`aten::gru` at
all, and over a Transformer encoder it ran 5.6x slower than a plain loop over 64 networks
(`python -m benchmarks.stacking`, benchmarks/results/stacking_probe.json). Matrices are stored
transposed, (K, fan_in, fan_out), and biases as (K, 1, n), so each layer is one `baddbmm`. On a CPU
the LSTM/GRU layers' time loop and the whole MLP run compiled where they can be built
(models/native.py), on a GPU the LSTM's runs as Triton kernels (models/gpu_recurrent.py), and as the
eager steps below elsewhere: the same computation.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import gpu_recurrent, native
from models.forecasters import float32_recurrence

# A bound parameter is a strided view of the weight matrix, so its gradient (a view of the gradient
# matrix) cannot be dense; PyTorch warns that this "may impair performance". It does not here: the
# gradient is added in place either way, and one (K, P) matrix is what makes Adam a few operations.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class StackedNetworks(nn.Module):
    """Base: the parameters of K single networks, one row each of a (K, P) matrix `weights`.

    A row holds a network's parameters in their single `named_parameters` order, each in this
    module's layout, so that the optimizer (elementwise, with per-network scalars) runs over the
    whole stack in a few operations. `grads` (K, P) receives the gradients as a parameter's .grad
    would: added by every backward, cleared by the caller.

    Subclasses define `forward(x, upto)`: networks 0..upto-1 (all by default) on x of shape
    (upto, batch, window), returning (upto, batch, horizon); they read their parameters from
    `bind(upto)`. Running a prefix lets a caller skip networks that have no batch left, without
    copying weights.
    """

    # False runs the eager layers even where compiled ones could run (tests and benchmarks compare the two).
    use_compiled = True

    def __init__(self, networks: list[nn.Module | dict[str, torch.Tensor]], template: nn.Module | None = None,
                 device: torch.device | str | None = None):  # fmt: skip
        """Stack `networks`: single modules, or their parameter dicts with a `template` module of the same spec.

        `device` places the stack there as it is built (its gradients are created there, not copied)."""
        super().__init__()
        named = [n if isinstance(n, dict) else dict(n.named_parameters()) for n in networks]
        template = template if template is not None else networks[0]
        singles = list(template.named_parameters())
        self.keys = [key for key, _ in singles]
        self.single_shapes = [tuple(tensor.shape) for _, tensor in singles]
        # Per parameter: "row" (a bias, stored (1, n)), "T" (a weight matrix, stored transposed) or
        # "same" (stored as is, e.g. a position table).
        self.layouts = [
            "row" if tensor.dim() == 1 else "T" if tensor.dim() == 2 and "weight" in key else "same"
            for key, tensor in singles
        ]
        self.shapes = [self._layout_shape(i) for i in range(len(self.keys))]
        stops = torch.tensor([math.prod(shape) for shape in self.shapes]).cumsum(0).tolist()
        self.columns = list(zip([0] + stops[:-1], stops))
        weights = self.rows([[n[key].detach() for n in named] for key in self.keys])
        self.register_buffer("weights", weights if device is None else weights.to(device))
        self.register_buffer("grads", torch.zeros_like(self.weights))

    def _layout_shape(self, index: int) -> tuple[int, ...]:
        shape, layout = self.single_shapes[index], self.layouts[index]
        return (1, shape[0]) if layout == "row" else (shape[1], shape[0]) if layout == "T" else shape

    def rows(self, per_parameter: list[list[torch.Tensor]]) -> torch.Tensor:
        """A (K, P) matrix in this module's layout from, per parameter, the K networks' single tensors."""
        blocks = []
        for index, pieces in enumerate(per_parameter):
            layout = self.layouts[index]
            stacked = torch.stack([p.T for p in pieces] if layout == "T" else pieces)
            blocks.append(stacked.reshape(len(pieces), -1))
        return torch.cat(blocks, dim=1)

    def view(self, matrix: torch.Tensor, index: int, upto: int | None = None) -> torch.Tensor:
        """Parameter number `index` of networks 0..upto-1 in a (K, P) matrix: a (upto, *layout shape) view."""
        start, stop = self.columns[index]
        block = matrix[:upto, start:stop]
        return block.view(block.shape[0], *self.shapes[index])

    def bind(self, upto: int | None = None) -> dict[str, torch.Tensor]:
        """The parameters of networks 0..upto-1 by state-dict name, as views of `weights`.

        Under grad mode each is a fresh leaf whose .grad is the matching view of `grads`, so a
        backward adds into `grads` in place (no gradient of a slice is ever zero-filled to full size).
        """
        tracking = torch.is_grad_enabled()
        bound = {}
        for index, key in enumerate(self.keys):
            tensor = self.view(self.weights, index, upto)
            if tracking:
                tensor.requires_grad_()
                tensor.grad = self.view(self.grads, index, upto)
            bound[key] = tensor
        return bound

    def mse_step(self, x: torch.Tensor, target: torch.Tensor, real: torch.Tensor | None, full: bool,
                 upto: int | None = None) -> torch.Tensor | None:  # fmt: skip
        """One compiled training step of networks 0..upto-1, where this stack has one; None where not.

        Returns each network's mean squared error over its `real` rows ((K, batch) bool; every row
        where `full`), (K,), and adds its gradients into `grads`. On None the caller runs forward,
        loss and backward through autograd instead."""
        return None

    def to_single(self, matrix: torch.Tensor, index: int, k: int) -> torch.Tensor:
        """Network k's parameter number `index` (its own storage, single layout) from a (K, P) matrix."""
        piece = self.view(matrix, index)[k]
        layout = self.layouts[index]
        return piece[0].clone() if layout == "row" else piece.T.contiguous() if layout == "T" else piece.clone()

    def singles(self, matrix: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter number `index` of every network from a (K, P) matrix: (K, *single shape), on the CPU, contiguous.

        One layout change for the whole stack: row k is network k's tensor as its single forecaster holds it.
        """
        layout = self.layouts[index]
        whole = self.view(matrix.detach(), index)
        whole = whole[:, 0] if layout == "row" else whole.transpose(1, 2) if layout == "T" else whole
        return whole.cpu().contiguous()

    def to_singles(self, matrix: torch.Tensor, index: int) -> list[torch.Tensor]:
        """Every network's parameter number `index` from a (K, P) matrix, on the CPU, each in its own storage.

        `singles`, then one small copy per network (a checkpoint of a view would carry the whole
        stack): ~20x cheaper than K calls of `to_single`.
        """
        return [piece.clone() for piece in self.singles(matrix, index).unbind(0)]

    def state_dict_of(self, k: int) -> dict[str, torch.Tensor]:
        """Network k's weights as its single forecaster's state dict."""
        return {key: self.to_single(self.weights, i, k).cpu() for i, key in enumerate(self.keys)}

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every network's weights as its single forecaster's state dict (state_dict_of for all k at once)."""
        columns = [self.to_singles(self.weights, i) for i in range(len(self.keys))]
        return [dict(zip(self.keys, row)) for row in zip(*columns)]

    @staticmethod
    def linear(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        """The stacked nn.Linear `prefix` of bound parameters `w` applied to x of shape (upto, rows, fan_in)."""
        return torch.baddbmm(w[f"{prefix}.bias"], x, w[f"{prefix}.weight"])


class StackedMLP(StackedNetworks):
    """K MLPForecasters: input (K, batch, window) -> output (K, batch, horizon)."""

    def compiled(self, x: torch.Tensor) -> bool:
        """Whether this stack runs its compiled code on x: switched on, usable there (native.usable) and no
        layer wider than native.MLP_MAX_WIDTH (wider, the eager products are faster)."""
        widest = max(shape[0] for key, shape in zip(self.keys, self.single_shapes) if key.endswith(".weight"))
        return self.use_compiled and widest <= native.MLP_MAX_WIDTH and native.usable(x)

    def mse_step(self, x, target, real, full, upto=None):
        if not (self.compiled(x) and torch.is_grad_enabled()):
            return None
        with torch.no_grad():
            real = real if real is not None else torch.ones(x.shape[:2], dtype=torch.bool)
            return native.load().mlp_mse_step(x, target, real, full, self._layer_views(self.weights, upto),
                                              self._layer_views(self.grads, upto))  # fmt: skip

    def _layer_views(self, matrix: torch.Tensor, upto: int | None) -> list[torch.Tensor]:
        """Every parameter of networks 0..upto-1 from a (K, P) matrix in order: weight, bias per layer."""
        return [self.view(matrix, index, upto) for index in range(len(self.keys))]

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        w = self.bind(upto)
        if self.compiled(x) and not x.requires_grad:
            # Its parameters are weight, bias per layer in order: the single forecaster's named_parameters.
            return native.mlp(x, [w[key] for key in self.keys])
        prefixes = [key[: -len(".weight")] for key in self.keys if key.endswith(".weight")]
        for i, prefix in enumerate(prefixes):
            x = self.linear(x, w, prefix)
            if i < len(prefixes) - 1:
                # In place: the product's backward needs its inputs, not its output. One fused iteration
                # of 1660 MLPs, alternated: 6.20-6.26 s against 6.27-6.58 s with a new tensor.
                x = torch.relu_(x)
        return x


class _StackedRecurrent(StackedNetworks):
    """Shared by LSTM and GRU: input projections of a whole layer in one product, then the steps."""

    module = ""  # the single forecaster's attribute holding its nn.LSTM / nn.GRU
    compiled_layer: type[torch.autograd.Function]  # models.native's layer, used where it is usable
    # models.native's first layer for one input value a step, which projects its input itself; or None.
    compiled_input_layer: type[torch.autograd.Function] | None = None
    gpu_layer: type[torch.autograd.Function] | None = None  # models.gpu_recurrent's, on CUDA where it is usable
    # The eager steps get projections that already hold the recurrent bias (run_layer's bias_hh is None).
    bias_hh_in_projection = False

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        k, batch, steps = x.shape
        w = self.bind(upto)
        layers = sum(key.startswith(f"{self.module}.weight_ih_l") for key in self.keys)
        # (K, time*batch, features), time-major: each step's projected inputs are then one block per
        # network, with no reordering copy of the whole projection (and none back in the backward).
        seq = x.transpose(1, 2).reshape(k, steps * batch, 1)
        with float32_recurrence(x.device.type):
            last = self._layers(seq, w, k, batch, steps, layers, self.layer_function(seq))
        return self.linear(last, w, "head")

    def layer_function(self, seq: torch.Tensor) -> type[torch.autograd.Function] | None:
        """The compiled layer that runs on `seq` (the CPU's, else the GPU's), or None for the eager steps."""
        if not self.use_compiled:
            return None
        if native.usable(seq):
            return self.compiled_layer
        hidden = self.single_shapes[self.keys.index(f"{self.module}.weight_hh_l0")][1]
        return self.gpu_layer if self.gpu_layer is not None and gpu_recurrent.usable(seq, hidden) else None

    def _layers(self, seq, w: dict, k: int, batch: int, steps: int, layers: int, compiled) -> torch.Tensor:
        """The last layer's hidden state at the last step, (K, batch, hidden); `compiled` is
        layer_function's answer."""
        for layer in range(layers):
            at = f"{self.module}.%s_l{layer}"
            if compiled is not None:
                if compiled is self.compiled_layer and self.compiled_input_layer is not None and seq.shape[-1] == 1:
                    # The series' one value a step: the layer forms its projections as it goes.
                    hidden = self.compiled_input_layer.apply(seq.view(k, steps, batch), w[at % "weight_ih"],
                                                             w[at % "weight_hh"], w[at % "bias_ih"],
                                                             w[at % "bias_hh"])  # fmt: skip
                else:
                    # The layer adds the input bias itself.
                    projected = torch.bmm(seq, w[at % "weight_ih"]).view(k, steps, batch, -1)
                    hidden = compiled.apply(projected, w[at % "weight_hh"], w[at % "bias_ih"], w[at % "bias_hh"])
                # Its output (K, time, batch, hidden) is the next layer's input as it is, with no stacking.
                seq, last = hidden.view(k, steps * batch, -1), hidden[:, -1]
            else:
                # All time steps' input projections at once, with the recurrent bias too where the
                # cell only ever adds it (the LSTM): one bias gradient per layer instead of one per step.
                bias_hh = w[at % "bias_hh"]
                bias = w[at % "bias_ih"] + bias_hh if self.bias_hh_in_projection else w[at % "bias_ih"]
                projected = torch.baddbmm(bias, seq, w[at % "weight_ih"]).view(k, steps, batch, -1)
                outputs = self.run_layer(projected, w[at % "weight_hh"],
                                         None if self.bias_hh_in_projection else bias_hh)  # fmt: skip
                last = outputs[-1]
                if layer < layers - 1:
                    seq = torch.stack(outputs, dim=1).reshape(k, steps * batch, -1)
        return last

    def run_layer(self, projected, weight_hh, bias_hh) -> list[torch.Tensor]:
        """Every step's hidden state (K, batch, hidden) given projected inputs (K, time, batch, gates).

        `bias_hh` is None where the projections hold it (bias_hh_in_projection)."""
        raise NotImplementedError


class StackedLSTM(_StackedRecurrent):
    """K LSTMForecasters (PyTorch's gate order i, f, g, o; zero initial state)."""

    module = "lstm"
    compiled_layer = native.LSTMLayer
    compiled_input_layer = native.LSTMInputLayer
    gpu_layer = gpu_recurrent.LSTMLayer
    # On a GPU, where these steps run, each whole-size add is another pass over the gates in memory.
    bias_hh_in_projection = True

    def run_layer(self, projected, weight_hh, bias_hh) -> list[torch.Tensor]:
        h = c = None
        outputs = []
        # unbind/chunk, not indexing: their backward assembles one gradient, where each slice's
        # backward would zero-fill and copy a whole-size tensor per step.
        for step in projected.unbind(1):
            gates = step if h is None else torch.baddbmm(step, h, weight_hh)
            i, f, g, o = gates.chunk(4, dim=-1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = i * g if c is None else torch.addcmul(f * c, i, g)
            h = o * torch.tanh(c)
            outputs.append(h)
        return outputs


class StackedGRU(_StackedRecurrent):
    """K GRUForecasters (PyTorch's gate order r, z, n; zero initial state)."""

    module = "gru"
    compiled_layer = native.GRULayer

    def run_layer(self, projected, weight_hh, bias_hh) -> list[torch.Tensor]:
        h = None
        outputs = []
        for step in projected.unbind(1):
            recurrent = bias_hh.expand(-1, step.shape[1], -1) if h is None else torch.baddbmm(bias_hh, h, weight_hh)
            step_r, step_z, step_n = step.chunk(3, dim=-1)
            rec_r, rec_z, rec_n = recurrent.chunk(3, dim=-1)
            r, z = torch.sigmoid(step_r + rec_r), torch.sigmoid(step_z + rec_z)
            n = torch.tanh(torch.addcmul(step_n, r, rec_n))
            h = n - z * n if h is None else torch.lerp(n, h, z)  # (1 - z) * n + z * h
            outputs.append(h)
        return outputs


class StackedTransformer(StackedNetworks):
    """K TransformerForecasters (post-norm encoder layers, ReLU feed-forward, no dropout).

    Computes only what the head reads, exactly (up to float rounding): the head reads the last position, so
    the last encoder layer runs for the last query alone and never projects keys or values (its scores
    are taken against its input through the key weights, its values combined before the value weights);
    and the first layer's input is rank one in the window's values, so its queries, keys and values are
    values x (embedding @ weights) plus a per-position constant, no per-token product. On the CPU the first
    layer's attention takes those slopes and constants whole and forms only what it needs (models/native.py:
    rank_one_attention), and each residual + norm + affine is one compiled pass (ResidualNorm); elsewhere,
    or with `use_compiled` off, the same computation runs eagerly.
    """

    def __init__(self, networks: list[nn.Module | dict[str, torch.Tensor]], template: nn.Module | None = None,
                 device: torch.device | str | None = None):  # fmt: skip
        super().__init__(networks, template, device)
        first = template if template is not None else networks[0]
        self.heads = first.encoder.layers[0].self_attn.num_heads
        self.eps = first.encoder.layers[0].norm1.eps
        self.layers = len(first.encoder.layers)

    def _residual_norm(self, a: torch.Tensor, b: torch.Tensor, w: dict, prefix: str) -> torch.Tensor:
        """The stacked LayerNorm `prefix` of a + b (K, rows, width), compiled where it can run so."""
        if self.use_compiled and native.usable(a):
            return native.ResidualNorm.apply(a, b, w[f"{prefix}.weight"], w[f"{prefix}.bias"], self.eps)
        normed = F.layer_norm(a + b, a.shape[-1:], eps=self.eps)
        return torch.addcmul(w[f"{prefix}.bias"], normed, w[f"{prefix}.weight"])

    def _rest_of_layer(self, resid: torch.Tensor, attended: torch.Tensor, w: dict, at: str) -> torch.Tensor:
        """Output projection, residual, norm, feed-forward, residual, norm: rows (K, n, width) in and out."""
        z = self._residual_norm(resid, self.linear(attended, w, f"{at}.self_attn.out_proj"), w, f"{at}.norm1")
        inner = torch.relu(self.linear(z, w, f"{at}.linear1"))
        return self._residual_norm(z, self.linear(inner, w, f"{at}.linear2"), w, f"{at}.norm2")

    def compiled(self, x: torch.Tensor) -> bool:
        """Whether the first layer's attention runs compiled (models/native.py) for windows x (K, B, T)."""
        return (self.use_compiled and not x.requires_grad and x.shape[-1] <= native.ATTENTION_MAX_STEPS
                and native.usable(x))  # fmt: skip

    def _every_position(self, z: torch.Tensor, w: dict, at: str, first: tuple | None) -> torch.Tensor:
        """An encoder layer on all positions: z (K, batch, time, width) in and out.

        `first` is (windows x (K, batch, time), embedding weight (K, 1, width), embedding bias plus
        position (K, time, width)) for the first layer, whose queries, keys and values are then rank one."""
        k, batch, steps, width = z.shape
        head_dim = width // self.heads
        weight, bias = w[f"{at}.self_attn.in_proj_weight"], w[f"{at}.self_attn.in_proj_bias"]
        if first is not None and self.compiled(first[0]):
            x, slope, base = first
            slopes, consts = torch.bmm(slope, weight).squeeze(1), torch.baddbmm(bias, base, weight)
            attended = native.rank_one_attention(x, slopes, consts, self.heads).view(k, batch * steps, width)
        else:
            if first is not None:
                x, slope, base = first
                projected = [torch.addcmul(torch.baddbmm(b, base, m).unsqueeze(1), x.unsqueeze(-1),
                                           torch.bmm(slope, m).unsqueeze(1))
                             for m, b in zip(weight.split(width, dim=2), bias.split(width, dim=2))]  # fmt: skip
            else:
                rows = z.view(k, batch * steps, width)
                projected = [torch.baddbmm(b, rows, m) for m, b in zip(weight.split(width, dim=2),
                                                                       bias.split(width, dim=2))]  # fmt: skip
            # q, k and v each viewed (K*batch, heads, time, head_dim) without a copy: SDPA then gives its
            # output and gradients in that same (time-before-heads) memory layout, where one product split
            # three ways cost two whole copies and a concatenation per layer.
            q, key, value = (p.view(k * batch, steps, self.heads, head_dim).transpose(1, 2) for p in projected)
            attended = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(k, batch * steps, width)
        return self._rest_of_layer(z.view(k, batch * steps, width), attended, w, at).view(k, batch, steps, width)

    def _last_position(self, z: torch.Tensor, w: dict, at: str) -> torch.Tensor:
        """An encoder layer's output at the last position only: z (K, batch, time, width) in, (K, batch, width) out.

        Per head h, the last query's scores are (q_h W_k,h^T) . z_j: the key bias shifts every score alike,
        which softmax ignores, so the keys are never formed; its output is (sum_j p_j z_j) W_v,h + b_v,h."""
        k, batch, steps, width = z.shape
        heads, head_dim = self.heads, width // self.heads
        weights = w[f"{at}.self_attn.in_proj_weight"].split(width, dim=2)
        biases = w[f"{at}.self_attn.in_proj_bias"].split(width, dim=2)
        last = z[:, :, -1]
        query = torch.baddbmm(biases[0], last, weights[0]) * head_dim**-0.5
        key_weights = weights[1].reshape(k, width, heads, head_dim)
        seen = torch.einsum("kbhe,kdhe->kbhd", query.view(k, batch, heads, head_dim), key_weights)
        sequences = z.reshape(k * batch, steps, width)
        scores = torch.bmm(seen.reshape(k * batch, heads, width), sequences.transpose(1, 2))
        mixed = torch.bmm(torch.softmax(scores, dim=-1), sequences).view(k, batch, heads, width)
        value_weights = weights[2].reshape(k, width, heads, head_dim)
        attended = torch.einsum("kbhd,kdhe->kbhe", mixed, value_weights).reshape(k, batch, width) + biases[2]
        return self._rest_of_layer(last, attended, w, at)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        w = self.bind(upto)
        # A token is value * embed.weight + embed.bias + position: rank one in the window's values.
        slope, base = w["embed.weight"], w["embed.bias"] + w["position"]
        z = torch.addcmul(base.unsqueeze(1), x.unsqueeze(-1), slope.unsqueeze(1))
        for layer in range(self.layers - 1):
            z = self._every_position(z, w, f"encoder.layers.{layer}", (x, slope, base) if layer == 0 else None)
        return self.linear(self._last_position(z, w, f"encoder.layers.{self.layers - 1}"), w, "head")


STACKED: dict[str, type[StackedNetworks]] = {
    "mlp": StackedMLP, "lstm": StackedLSTM, "gru": StackedGRU, "transformer": StackedTransformer,
}  # fmt: skip


def stack(
    architecture: str, networks: list[nn.Module | dict[str, torch.Tensor]], template: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> StackedNetworks:  # fmt: skip
    """The stacked version of `networks` (all of `architecture` and one spec): modules, or parameter
    dicts (state-dict names) with a `template` module of that spec giving their order and shapes;
    built on `device` where one is given."""
    return STACKED[architecture](networks, template, device)


class StackedAdam:
    """Adam over a stack's (K, P) weights with a step count and learning rate per network, and a mask of who steps.

    Adam is elementwise, so on stacked tensors each network's update is its own; what is not, the
    step count behind the bias correction and the learning rate (schedules), is kept per network
    and broadcast over its row. A network masked out of a step (it has no batch left this epoch,
    its loss blew up, or it stopped early) is left exactly as it was. The arithmetic is
    torch.optim.Adam's (its fused CPU/CUDA kernel), so a network trained here matches one trained
    alone within float tolerance. Steps read the gradients from `stacked.grads`.

    `rowwise` (the default on a GPU) instead updates every row at once with its own step count and
    rate, held on the device: the fused kernel takes one count and rate per call, and finding the
    runs needs the mask on the host, a wait for the GPU every step. `lr` and `steps` are float64
    (K,) tensors on the host, or on the device where rowwise; assign into them in place.
    """

    def __init__(self, stacked: StackedNetworks, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 rowwise: bool | None = None):  # fmt: skip
        self.params, self.grads = stacked.weights, stacked.grads
        (self.beta1, self.beta2), self.eps = betas, eps
        self.rowwise = self.params.is_cuda if rowwise is None else rowwise
        k = self.params.shape[0]
        where = self.params.device if self.rowwise else "cpu"
        self.lr = torch.full((k,), float(lr), dtype=torch.float64, device=where)
        self.steps = torch.zeros(k, dtype=torch.float64, device=where)
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)

    def zero_grad(self) -> None:
        self.grads.zero_()

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, upto: int) -> None:
        """Scale each network's gradient to global L2 norm <= max_norm, as clip_grad_norm_ does alone."""
        grads = self.grads[:upto]
        norms = grads.double().pow(2).sum(dim=1).sqrt()
        grads.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).to(grads.dtype).unsqueeze(1))

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """Update networks 0..len(active)-1 where `active` (bool) is True; later networks are untouched.

        Row-wise (`_step_rows`) where the optimizer is; otherwise PyTorch's fused Adam kernel (one
        pass over each tensor, as torch.optim.Adam(fused=True)) does the update. It takes one step
        count and learning rate per call, so each run of adjacent networks stepping with the same
        pair shares a call. Runs are few: a fused group is sorted longest first, so step counts
        (epochs x batches per epoch) only fall along it. A masked network is simply not passed.
        """
        if self.rowwise:
            self._step_rows(active)
            return
        upto = active.shape[0]
        # numpy views of the (CPU) step counts and rates: finding runs with torch ops on these tiny
        # vectors cost ~0.2 ms a step, as much as the kernel's own work for 128 MLPs.
        on = active.cpu().numpy()
        steps, lr = self.steps.numpy()[:upto], self.lr.numpy()[:upto]
        steps += on
        changes = (steps[1:] != steps[:-1]) | (lr[1:] != lr[:-1]) | (on[1:] != on[:-1])
        edges = [0, *(np.flatnonzero(changes) + 1).tolist(), upto]
        for start, stop in zip(edges[:-1], edges[1:]):
            if on[start]:
                self._fused(slice(start, stop), float(steps[start]), float(lr[start]))

    def _step_rows(self, active: torch.Tensor) -> None:
        """The fused kernel's arithmetic over rows 0..len(active)-1, each with its own count and rate, in a
        few whole-stack operations and no wait for the device; rows not `active` keep their values."""
        upto = active.shape[0]
        on = active.to(self.params.device, non_blocking=True).unsqueeze(1)
        steps = self.steps[:upto]
        steps += on.squeeze(1)
        counted = steps.clamp(min=1)  # a row that never stepped is not updated: no division by zero
        dtype = self.params.dtype
        step_size = (self.lr[:upto] / (1 - self.beta1**counted)).to(dtype).unsqueeze(1)
        correction = (1 - self.beta2**counted).sqrt().to(dtype).unsqueeze(1)
        grad, param = self.grads[:upto], self.params[:upto]
        exp_avg, exp_avg_sq = self.exp_avg[:upto], self.exp_avg_sq[:upto]
        new_avg = torch.add(exp_avg * self.beta1, grad, alpha=1 - self.beta1)
        new_avg_sq = torch.addcmul(exp_avg_sq * self.beta2, grad, grad, value=1 - self.beta2)
        denom = new_avg_sq.sqrt().div_(correction).add_(self.eps)
        new_param = param - step_size * new_avg / denom
        # `where`, so a masked row's NaN or infinite gradient cannot reach its values.
        exp_avg.copy_(torch.where(on, new_avg, exp_avg))
        exp_avg_sq.copy_(torch.where(on, new_avg_sq, exp_avg_sq))
        param.copy_(torch.where(on, new_param, param))

    def _fused(self, rows: slice, step: float, lr: float) -> None:
        """One call of the fused Adam kernel over `rows` of the stack, all at step `step` with rate `lr`.

        The step count goes in as torch.optim.Adam(fused=True) keeps it: a float32 tensor on the
        parameters' device (the CUDA kernel reads it there).
        """
        torch._fused_adam_(
            [self.params[rows]], [self.grads[rows]], [self.exp_avg[rows]], [self.exp_avg_sq[rows]], [],
            [torch.tensor(step, dtype=torch.float32, device=self.params.device)], lr=lr, beta1=self.beta1, beta2=self.beta2,
            weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False,
        )  # fmt: skip


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
