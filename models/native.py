"""The stacked layers as compiled CPU code (models/csrc/), built on first use: LSTM/GRU layers, whole MLPs and
the Transformer's first attention.

Eager PyTorch runs a stacked recurrent step as ~10 small elementwise kernels forward and ~20 backward,
each a pass over memory; the compiled layer runs each step as one batched product and one vectorized
pass, and its backward is written out (recurrent_cpu.cpp). A stacked MLP runs one network at a time with
its activations in the L1 cache, the bias, ReLU and their gradients applied inside its own small
products (mlp_cpu.cpp). The Transformer's first layer attends from its rank-one queries, keys and values
(value * slope + constant) one window and head at a time in L1, its scores from terms computed once per
network (attention_cpu.cpp), and its post-norm sublayers end in one pass for residual, norm and affine
(norm_cpu.cpp). `torch.utils.cpp_extension` builds them with the machine's C++ compiler into PyTorch's
extension cache (~90 s once on 2 cores; later processes load it in well under a second).
It is built for the CPU it runs on (`-march=native`), so the build's name carries a digest of the
CPU's feature flags: machines of a cluster that share a home directory never load each other's build.

Where it cannot be built (no compiler, not Linux/x86) or `MANYNETS_NATIVE=0` is set, `load()` returns
None and the stacked models stay eager: the same results, more slowly. Calibration measures whichever
runs, so the strategy choice stays honest either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name for name in ("bindings.cpp", "recurrent_cpu.cpp", "mlp_cpu.cpp", "attention_cpu.cpp", "norm_cpu.cpp")
]
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512"]
# Windows longer than this attend through PyTorch's attention (the compiled one holds a window in 4 vectors).
ATTENTION_MAX_STEPS = 64
ENV_SWITCH = "MANYNETS_NATIVE"
STALE_LOCK_SECONDS = 600
# The widest layer the compiled MLP runs: its products keep a network's weights in L1/L2, and past this
# eager PyTorch's batched products win (one step of 32 two-layer MLPs: 1.24x faster at 192 wide, 0.96x at 256,
# 0.93x at 384; `python -m benchmarks.compiled_recurrent --architectures mlp --widths 32 --hidden 32 64 128 192
# 256 384 --repeats 7 --output compiled_mlp_widths.json`).
MLP_MAX_WIDTH = 192

_lock = threading.Lock()
_module = None
_tried = False


def cpu_tag() -> str:
    """A short digest of this CPU's model and feature flags (Linux), or of `platform` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = [platform.machine(), platform.processor()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


def enabled() -> bool:
    """False where the user switched the compiled layer off (`MANYNETS_NATIVE=0`)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def load():
    """The compiled module, building it on first call; None where it is off or cannot be built.

    Thread-safe and cached for the process; concurrent processes share one build (PyTorch locks the
    build directory). A failed build is logged once and not retried in this process.
    """
    global _module, _tried
    if not enabled():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _module = _build()
                _tried = True
    return _module


def _build():
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        logger.info("compiled stacked layers skipped on %s: the eager layers run", platform.machine())
        return None
    # PyTorch runs `ninja` by name: the one pip installs with this project sits beside the interpreter,
    # which is on PATH only in an activated virtual environment.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        from torch.utils.cpp_extension import load as load_extension

        name = f"manynets_stacked_{cpu_tag()}"
        _clear_stale_lock(name)
        logger.info("loading the compiled stacked layers (built on this machine's first use, ~1.5 min)")
        # PyTorch rebuilds when a source or a flag changes, not a header: the headers' digest is a flag.
        headers = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.h")))).hexdigest()[:10]
        return load_extension(name, [str(source) for source in SOURCES],
                              extra_cflags=FLAGS + [f"-DMANYNETS_HEADERS={headers}"], verbose=False)  # fmt: skip
    except Exception as error:  # a missing compiler or headers: training goes on eagerly
        logger.warning("could not build the compiled stacked layers (%s); the stacked networks run eagerly. "
                       "Install a C++ compiler (g++) to get it, or set %s=0 to skip trying.",
                       str(error).splitlines()[0] if str(error) else type(error).__name__, ENV_SWITCH)
        return None


def _clear_stale_lock(name: str) -> None:
    """Remove a build lock left by a process killed while building (PyTorch would wait on it forever).

    A build takes about a minute; a lock older than STALE_LOCK_SECONDS cannot belong to a live build.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("removing a stale build lock %s", lock)
            lock.unlink(missing_ok=True)
    except (ImportError, OSError):  # a private helper of PyTorch's: without it, nothing to clear
        pass


def usable(x: torch.Tensor) -> bool:
    """Whether a layer on x can run compiled: float32 on the CPU, outside autocast, and built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and load() is not None)


def _backpropagate_once(ctx) -> None:
    """Refuse a second backward through a compiled LSTM layer: its first wrote over what it saved."""
    if getattr(ctx, "spent", False):
        raise RuntimeError("the compiled LSTM layer backpropagates once per forward: retain_graph is not "
                           "supported (set MANYNETS_NATIVE=0 for the eager layer)")
    ctx.spent = True


class LSTMLayer(torch.autograd.Function):
    """Hidden states (K, T, B, H) of K LSTM layers given inputs projected without their bias (K, T, B, 4H).

    The gates are computed over `projected` (a step of 4 networks 8% faster than into a new buffer), so
    the caller passes a tensor nothing else reads: the product's output, as models/stacked.py does.
    """

    @staticmethod
    def forward(ctx, projected, weight_hh, bias_ih, bias_hh):
        hs, gates, cs = load().lstm_forward(projected, weight_hh, bias_ih, bias_hh)
        ctx.save_for_backward(gates, cs, hs, weight_hh)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        # The backward writes the gates' gradients over the saved gates (one buffer fewer: a step of 4
        # networks 6% faster), so a second backward through the same graph would read gradients.
        _backpropagate_once(ctx)
        gates, cs, hs, weight_hh = ctx.saved_tensors
        return tuple(load().lstm_backward(grad_hs, gates, cs, hs, weight_hh))


class LSTMInputLayer(torch.autograd.Function):
    """LSTMLayer for a first layer of one input value a step: input (K, T, B), weight_ih (K, 1, 4H).

    The layer forms the projections input x weight_ih itself, so no (K, T, B, 4H) product is written
    and read back, and their weights' gradient is summed as the gates' gradients are formed.
    """

    @staticmethod
    def forward(ctx, values, weight_ih, weight_hh, bias_ih, bias_hh):
        hs, gates, cs = load().lstm_input_forward(values, weight_ih, weight_hh, bias_ih, bias_hh)
        ctx.save_for_backward(gates, cs, hs, weight_hh, values, weight_ih)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        _backpropagate_once(ctx)
        gates, cs, hs, weight_hh, values, weight_ih = ctx.saved_tensors
        grad_gates, grad_hh, grad_bias_ih, grad_bias_hh, grad_ih = load().lstm_input_backward(
            grad_hs, gates, cs, hs, weight_hh, values)
        # The input is the data, which training does not differentiate; formed only where asked for.
        grad_values = (grad_gates.flatten(1, 2) @ weight_ih.transpose(1, 2)).view_as(values) \
            if ctx.needs_input_grad[0] else None
        return grad_values, grad_ih, grad_hh, grad_bias_ih, grad_bias_hh


class GRULayer(torch.autograd.Function):
    """Hidden states (K, T, B, H) of K GRU layers given inputs projected without their bias (K, T, B, 3H)."""

    @staticmethod
    def forward(ctx, projected, weight_hh, bias_ih, bias_hh):
        hs, saved = load().gru_forward(projected, weight_hh, bias_ih, bias_hh)
        ctx.save_for_backward(saved, hs, weight_hh)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        saved, hs, weight_hh = ctx.saved_tensors
        return tuple(load().gru_backward(grad_hs, saved, hs, weight_hh))


class MLPStack(torch.autograd.Function):
    """Outputs (K, B, horizon) of K whole MLPs on inputs x (K, B, window) that need no gradient.

    `params` are the stacked layers' weights (K, fan_in, fan_out) and biases (K, 1, fan_out), in
    order. The hidden layers' ReLU outputs are kept for the backward (as eager autograd keeps them).
    The engine's training step does not come here: `mlp_mse_step` (StackedMLP.mse_step) runs forward,
    loss and backward in one call.
    """

    @staticmethod
    def forward(ctx, x, *params):
        output, *hidden = load().mlp_forward(x, list(params), True)
        ctx.save_for_backward(x, *hidden, *params)
        ctx.hidden = len(hidden)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, *rest = ctx.saved_tensors
        hidden, params = rest[: ctx.hidden], rest[ctx.hidden :]
        return (None, *load().mlp_backward(grad_output, x, hidden, list(params)))


class RankOneAttention(torch.autograd.Function):
    """The attention (K, B, T, width) of K stacked encoder layers whose q, k and v are x * slope + const.

    x (K, B, T): the windows' values, which need no gradient; slopes (K, 3 * width) and consts
    (K, T, 3 * width): q, k and v side by side, as a fused in-projection lays them out. Windows of
    at most ATTENTION_MAX_STEPS steps.
    """

    @staticmethod
    def forward(ctx, x, slopes, consts, heads):
        out, lse = load().rank_one_attention_forward(x, slopes, consts, heads)
        ctx.save_for_backward(x, slopes, consts, out, lse)
        ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, slopes, consts, out, lse = ctx.saved_tensors
        dslopes, dconsts = load().rank_one_attention_backward(grad_out, x, slopes, consts, ctx.heads, out, lse)
        return None, dslopes, dconsts, None


def rank_one_attention(x: torch.Tensor, slopes: torch.Tensor, consts: torch.Tensor, heads: int) -> torch.Tensor:
    """RankOneAttention on contiguous inputs; x must not need a gradient (its gradient is not computed)."""
    if x.requires_grad:
        raise ValueError("the compiled attention does not compute the values' gradient; run the eager layers")
    return RankOneAttention.apply(x.contiguous(), slopes.contiguous(), consts.contiguous(), heads)


class ResidualNorm(torch.autograd.Function):
    """layer_norm(a + b) * weight + bias over the last dimension, per network.

    a, b (K, R, W); weight and bias (K, 1, W), each network's own (F.layer_norm takes one for all)."""

    @staticmethod
    def forward(ctx, a, b, weight, bias, eps):
        out, normed, rstd = load().residual_norm_forward(a, b, weight, bias, eps)
        ctx.save_for_backward(normed, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        normed, rstd, weight = ctx.saved_tensors
        grad_in, grad_weight, grad_bias = load().residual_norm_backward(grad_out, normed, rstd, weight)
        return grad_in, grad_in, grad_weight, grad_bias, None


def mlp(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """K stacked MLPs on x (K, B, window) through the compiled kernels; `params` as MLPStack's.

    Under grad mode through MLPStack (x must not need a gradient); outside it forward only, keeping nothing."""
    if not torch.is_grad_enabled():
        return load().mlp_forward(x, params, False)[0]
    if x.requires_grad:
        raise ValueError("the compiled MLP does not compute its input's gradient; run the eager layers")
    return MLPStack.apply(x, *params)
