"""The stacked LSTM layer on a GPU: one Triton kernel per layer each way, every time step inside it.

Eager PyTorch runs a stacked LSTM step as ~10 small kernels forward and ~20 backward: one fused
iteration of 1660 LSTMs on an H100 launched 60,579 kernels, and the host's launches, not the GPU, set
the pace (`torch.profiler`; README, GPU targets). A layer's rows (network, sample) are independent
sequences, so each program here takes 32 rows of one network through all time steps with h and c in
registers and the recurrent product as `tl.dot`: one launch per layer forward and one backward, where
one kernel per time step still cost ~100 us of host time a step. Inputs, outputs and saved state are
those of models/native.py's compiled CPU layer; the recurrent weights' gradient is one batched
product over all steps after the loop.

Triton ships with PyTorch's CUDA wheels. Where it is missing, the device is not CUDA, or
`MANYNETS_NATIVE=0` is set, `usable()` is False and the eager steps run: the same results, more slowly.
With `TRITON_INTERPRET=1` set before Triton is imported, the kernels run on CPU tensors: the tests
run the layer so where no GPU is (production code never picks it on a CPU, which has models/native.py).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from models import native

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the eager steps run on a GPU, if one appears
    triton = tl = None

ROWS_PER_PROGRAM = 32  # a program's share of one network's batch: its rows' h and c stay in registers


def available() -> bool:
    """Whether Triton is importable (it ships with PyTorch's CUDA wheels)."""
    return triton is not None


# A program holds a network's four (H, H) recurrent weight blocks: up to 64 wide (blocks of 64) they passed
# tests/test_gpu_recurrent.py on an H100; wider layers run the eager steps until measured there.
MAX_HIDDEN = 64
_broken: list[str] = []  # why the kernels failed in this process (warm_up), if they did


def usable(x: torch.Tensor, hidden: int | None = None) -> bool:
    """Whether a layer on x (of `hidden` units, where known) can run this way: float32 on CUDA, outside
    autocast, at most MAX_HIDDEN wide, Triton present and working, not switched off (MANYNETS_NATIVE=0)."""
    return (x.device.type == "cuda" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cuda")
            and (hidden is None or hidden <= MAX_HIDDEN) and native.enabled() and available()
            and not _broken)  # fmt: skip


if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        # tanh(x) = 2 sigmoid(2x) - 1, exact at both ends (exp overflowing to inf gives -1).
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _gate_weights(weight, hidden, gate, stride_wr, stride_wc, transposed: tl.constexpr, BLOCK_H: tl.constexpr):
        """A gate's (H, H) block of a network's recurrent weights (H, 4H), or its transpose; zero past H."""
        a = tl.arange(0, BLOCK_H)[:, None]
        b = tl.arange(0, BLOCK_H)[None, :]
        if transposed:
            a, b = b, a
        mask = (a < hidden) & (b < hidden)
        return tl.load(weight + a * stride_wr + (gate * hidden + b) * stride_wc, mask=mask, other=0.0)

    # Each program runs one network's BLOCK_R rows through every time step: the rows are independent
    # sequences, so their h and c stay in registers and a whole layer is one launch each way.
    @triton.jit(do_not_specialize=["steps", "batch", "stride_wk"])
    def _lstm_layer_forward(
        gates, bias, weight, cs, hs, steps, batch, hidden, stride_wk, stride_wr, stride_wc,
        BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """gates (K, T, B, 4H): the input projections in, their activations out; c and h (K, T, B, H) out."""
        k = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        j = tl.arange(0, BLOCK_H)[None, :]
        mask = (r < batch) & (j < hidden)
        w = weight + k * stride_wk
        w_i = _gate_weights(w, hidden, 0, stride_wr, stride_wc, False, BLOCK_H)
        w_f = _gate_weights(w, hidden, 1, stride_wr, stride_wc, False, BLOCK_H)
        w_g = _gate_weights(w, hidden, 2, stride_wr, stride_wc, False, BLOCK_H)
        w_o = _gate_weights(w, hidden, 3, stride_wr, stride_wc, False, BLOCK_H)
        b = bias + k * 4 * hidden + j
        b_i = tl.load(b, mask=j < hidden, other=0.0)
        b_f = tl.load(b + hidden, mask=j < hidden, other=0.0)
        b_g = tl.load(b + 2 * hidden, mask=j < hidden, other=0.0)
        b_o = tl.load(b + 3 * hidden, mask=j < hidden, other=0.0)
        h = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        c = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        for t in range(steps):
            row = (k * steps + t) * batch + r
            g = gates + row * 4 * hidden + j
            # "ieee": exact float32 products, as cuBLAS gives with TF32 off (ModelSpec.float32_math).
            pre_i = tl.load(g, mask=mask, other=0.0) + b_i + tl.dot(h, w_i, input_precision="ieee")
            pre_f = tl.load(g + hidden, mask=mask, other=0.0) + b_f + tl.dot(h, w_f, input_precision="ieee")
            pre_g = tl.load(g + 2 * hidden, mask=mask, other=0.0) + b_g + tl.dot(h, w_g, input_precision="ieee")
            pre_o = tl.load(g + 3 * hidden, mask=mask, other=0.0) + b_o + tl.dot(h, w_o, input_precision="ieee")
            i, f, gg, o = _sigmoid(pre_i), _sigmoid(pre_f), _tanh(pre_g), _sigmoid(pre_o)
            c = f * c + i * gg  # c is zero before the first step
            h = o * _tanh(c)  # past H: zero (a zero pre-activation's g is 0), so the products see none
            tl.store(g, i, mask=mask)
            tl.store(g + hidden, f, mask=mask)
            tl.store(g + 2 * hidden, gg, mask=mask)
            tl.store(g + 3 * hidden, o, mask=mask)
            tl.store(cs + row * hidden + j, c, mask=mask)
            tl.store(hs + row * hidden + j, h, mask=mask)

    @triton.jit(do_not_specialize=["steps", "batch", "stride_wk"])
    def _lstm_layer_backward(
        gates, cs, grad_hs, weight, steps, batch, hidden, stride_wk, stride_wr, stride_wc,
        BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """The pre-activations' gradient written over the saved activations (each read first, never again)."""
        k = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        j = tl.arange(0, BLOCK_H)[None, :]
        mask = (r < batch) & (j < hidden)
        w = weight + k * stride_wk
        wt_i = _gate_weights(w, hidden, 0, stride_wr, stride_wc, True, BLOCK_H)
        wt_f = _gate_weights(w, hidden, 1, stride_wr, stride_wc, True, BLOCK_H)
        wt_g = _gate_weights(w, hidden, 2, stride_wr, stride_wc, True, BLOCK_H)
        wt_o = _gate_weights(w, hidden, 3, stride_wr, stride_wc, True, BLOCK_H)
        grad_rec = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)  # from the step after, through W_hh
        grad_c = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        for s in range(steps):
            t = steps - 1 - s
            row = (k * steps + t) * batch + r
            g = gates + row * 4 * hidden + j
            i = tl.load(g, mask=mask, other=0.0)
            f = tl.load(g + hidden, mask=mask, other=0.0)
            gg = tl.load(g + 2 * hidden, mask=mask, other=0.0)
            o = tl.load(g + 3 * hidden, mask=mask, other=0.0)
            tc = _tanh(tl.load(cs + row * hidden + j, mask=mask, other=0.0))  # recomputed: one buffer fewer
            # The state before the first step is zero.
            later = (r * 0 + t) > 0  # a tensor, as a load's mask must be
            c_prev = tl.load(cs + tl.where(later, row - batch, row) * hidden + j, mask=mask & later, other=0.0)
            dh = tl.load(grad_hs + row * hidden + j, mask=mask, other=0.0) + grad_rec
            dc = grad_c + dh * o * (1.0 - tc * tc)
            d_i = dc * gg * i * (1.0 - i)
            d_f = dc * c_prev * f * (1.0 - f)
            d_g = dc * i * (1.0 - gg * gg)
            d_o = dh * tc * o * (1.0 - o)
            tl.store(g, d_i, mask=mask)
            tl.store(g + hidden, d_f, mask=mask)
            tl.store(g + 2 * hidden, d_g, mask=mask)
            tl.store(g + 3 * hidden, d_o, mask=mask)
            grad_c = dc * f
            grad_rec = tl.dot(d_i, wt_i, input_precision="ieee") + tl.dot(d_f, wt_f, input_precision="ieee")
            grad_rec += tl.dot(d_g, wt_g, input_precision="ieee") + tl.dot(d_o, wt_o, input_precision="ieee")


def _launch(kernel, k: int, batch: int, hidden: int, device: torch.device, *args) -> None:
    # tl.dot needs blocks of at least 16; a wider block than H is masked.
    grid = (k, triton.cdiv(batch, ROWS_PER_PROGRAM))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, BLOCK_H=max(16, triton.next_power_of_2(hidden)), BLOCK_R=ROWS_PER_PROGRAM)


def warm_up(device: str) -> None:
    """Compile the layer's kernels for the default hidden size (32) in this process, where usable on `device`.

    Triton compiles a kernel on its first launch (later processes read its on-disk cache): a worker
    does it here, before any timed task; other widths compile on first use. Where they fail to
    compile or run (a GPU or driver Triton cannot build for), the failure is logged and this process
    trains LSTMs with the eager steps instead of failing every task.
    """
    if not usable(torch.empty(0, device=device)):
        return
    k, steps, batch, hidden = 2, 3, 4, 32
    try:
        projected = torch.randn(k, steps, batch, 4 * hidden, device=device, requires_grad=True)
        weight = torch.randn(k, hidden, 4 * hidden, device=device, requires_grad=True)
        bias = torch.zeros(k, 1, 4 * hidden, device=device, requires_grad=True)
        LSTMLayer.apply(projected * 1, weight, bias, bias).sum().backward()
    except Exception as error:
        _broken.append(f"{type(error).__name__}: {error}")
        logger.warning("the GPU LSTM layer's Triton kernels failed on %s (%s); LSTMs train with the eager steps "
                       "in this process", device, _broken[-1].splitlines()[0])  # fmt: skip


def _recurrent_weight_grad(hs: torch.Tensor, grad_gates: torch.Tensor) -> torch.Tensor:
    """Every step's contribution to the recurrent weights' gradient (K, H, 4H) in one product."""
    k, steps, batch, hidden = hs.shape
    if steps < 2:
        return hs.new_zeros(k, hidden, grad_gates.shape[-1])
    return torch.bmm(hs[:, :-1].reshape(k, (steps - 1) * batch, hidden).transpose(1, 2),
                     grad_gates[:, 1:].reshape(k, (steps - 1) * batch, -1))  # fmt: skip


class LSTMLayer(torch.autograd.Function):
    """Hidden states (K, T, B, H) of K LSTM layers given inputs projected without their bias (K, T, B, 4H).

    As models.native.LSTMLayer: the gates are computed over `projected`, so the caller passes a
    tensor nothing else reads (the product's output), and a graph backpropagates through it once.
    """

    @staticmethod
    def forward(ctx, projected, weight_hh, bias_ih, bias_hh):
        gates = projected.contiguous()
        k, steps, batch, four_h = gates.shape
        hidden = four_h // 4
        bias = (bias_ih + bias_hh).reshape(k, four_h).contiguous()
        hs = gates.new_empty(k, steps, batch, hidden)
        cs = gates.new_empty(k, steps, batch, hidden)
        _launch(_lstm_layer_forward, k, batch, hidden, gates.device, gates, bias, weight_hh, cs, hs, steps, batch,
                hidden, *weight_hh.stride())  # fmt: skip
        ctx.save_for_backward(gates, cs, hs, weight_hh)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        if getattr(ctx, "spent", False):
            raise RuntimeError("the GPU LSTM layer backpropagates once per forward: retain_graph is not "
                               "supported (set MANYNETS_NATIVE=0 for the eager layer)")
        ctx.spent = True
        gates, cs, hs, weight_hh = ctx.saved_tensors
        k, steps, batch, four_h = gates.shape
        hidden = four_h // 4
        grad_gates = gates  # overwritten step by step: the activations are read first, never again
        _launch(_lstm_layer_backward, k, batch, hidden, gates.device, grad_gates, cs, grad_hs.contiguous(),
                weight_hh, steps, batch, hidden, *weight_hh.stride())  # fmt: skip
        grad_bias = grad_gates.sum(dim=(1, 2)).unsqueeze(1)
        return grad_gates, _recurrent_weight_grad(hs, grad_gates), grad_bias, grad_bias
