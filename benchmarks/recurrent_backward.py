"""Would a hand-written backward (BPTT) make the stacked GRU faster? Autograd vs a custom autograd.Function.

models/stacked.py runs a stacked GRU layer step by step and lets autograd record every gate. The
alternative measured here runs the forward without recording, keeps each step's gates in
preallocated buffers, and walks the steps back once by hand, with the recurrent weight's gradient as
one product over all steps. Both compute the same gradients (checked here to float tolerance); the
question is only time. One forward+backward of K stacked GRU layers (batch 128, 32 steps, 32 wide),
one thread, best of 5; against it, what a plain loop pays for the same layer: oneDNN's `nn.GRU`
(one layer, input size 1) forward and backward K times.
Prints a table and writes benchmarks/results/recurrent_backward.json.
Run: `python -m benchmarks.recurrent_backward [--widths 4 16 64]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from models import ModelSpec, build_model
from models.stacked import StackedGRU, stack

RESULTS = Path(__file__).with_name("results")


class HandWrittenGRULayer(torch.autograd.Function):
    """One stacked GRU layer over all steps; inputs projected (K, T, B, 3H), weight_hh (K, H, 3H), bias_hh (K, 1, 3H)."""

    @staticmethod
    def forward(ctx, projected, weight_hh, bias_hh):
        k, steps, batch, gates = projected.shape
        hidden = gates // 3
        hs = projected.new_zeros(k, steps + 1, batch, hidden)
        rz = projected.new_empty(k, steps, batch, 2 * hidden)
        n = projected.new_empty(k, steps, batch, hidden)
        rec = projected.new_empty(k, steps, batch, gates)
        for t in range(steps):
            if t == 0:
                rec[:, 0].copy_(bias_hh.expand(-1, batch, -1))
            else:
                torch.baddbmm(bias_hh, hs[:, t], weight_hh, out=rec[:, t])
            step = projected[:, t]
            torch.add(step[..., : 2 * hidden], rec[:, t, :, : 2 * hidden], out=rz[:, t]).sigmoid_()
            torch.addcmul(step[..., 2 * hidden :], rz[:, t, :, :hidden], rec[:, t, :, 2 * hidden :], out=n[:, t]).tanh_()
            torch.lerp(n[:, t], hs[:, t], rz[:, t, :, hidden:], out=hs[:, t + 1])
        ctx.save_for_backward(weight_hh, hs, rz, n, rec)
        return hs[:, 1:]

    @staticmethod
    def backward(ctx, grad_out):
        weight_hh, hs, rz, n, rec = ctx.saved_tensors
        k, steps, batch, hidden = grad_out.shape
        d_proj = grad_out.new_empty(k, steps, batch, 3 * hidden)
        d_rec = grad_out.new_empty(k, steps, batch, 3 * hidden)
        weight_t = weight_hh.transpose(1, 2)
        slope = torch.addcmul(rz, rz, rz, value=-1)  # sigmoid' = s(1 - s)
        dh = grad_out[:, steps - 1]
        for t in range(steps - 1, -1, -1):
            if t < steps - 1:
                dh = dh + grad_out[:, t]
            r, z, now = rz[:, t, :, :hidden], rz[:, t, :, hidden:], n[:, t]
            dn = torch.addcmul(dh, dh, z, value=-1)
            da_n = torch.addcmul(dn, dn * now, now, value=-1, out=d_proj[:, t, :, 2 * hidden :])
            torch.mul(da_n, r, out=d_rec[:, t, :, 2 * hidden :])
            torch.mul(da_n * rec[:, t, :, 2 * hidden :], slope[:, t, :, :hidden], out=d_proj[:, t, :, :hidden])
            torch.mul(dh * (hs[:, t] - now), slope[:, t, :, hidden:], out=d_proj[:, t, :, hidden : 2 * hidden])
            d_rec[:, t, :, : 2 * hidden].copy_(d_proj[:, t, :, : 2 * hidden])
            if t > 0:
                dh = torch.baddbmm(dh * z, d_rec[:, t], weight_t)
        flat = d_rec.view(k, steps * batch, 3 * hidden)
        d_weight = torch.bmm(hs[:, :steps].reshape(k, steps * batch, hidden).transpose(1, 2), flat)
        return d_proj, d_weight, flat.sum(dim=1, keepdim=True)


def autograd_layer(layer: StackedGRU, projected, weight_hh, bias_hh) -> torch.Tensor:
    """The engine's layer (recorded by autograd), in the (K, T, B, .) layout it and this benchmark share."""
    return torch.stack(layer.run_layer(projected, weight_hh, bias_hh), dim=1)


def best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = ModelSpec(architecture="gru")
    rows = []
    for width in args.widths:
        layer = stack("gru", [build_model(spec, torch.Generator().manual_seed(k)) for k in range(width)])
        w = layer.bind()
        weight_hh, bias_hh = (w[key].detach().clone().requires_grad_() for key in ("gru.weight_hh_l0", "gru.bias_hh_l0"))
        projected = torch.randn(width, spec.window, 128, 3 * spec.hidden, requires_grad=True)
        upstream = torch.randn(width, spec.window, 128, spec.hidden)
        grads = []
        for run in (lambda: HandWrittenGRULayer.apply(projected, weight_hh, bias_hh),
                    lambda: autograd_layer(layer, projected, weight_hh, bias_hh)):  # fmt: skip
            projected.grad = weight_hh.grad = bias_hh.grad = None
            (run() * upstream).sum().backward()
            grads.append([projected.grad, weight_hh.grad, bias_hh.grad])
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*grads))
        hand = best_of(lambda: HandWrittenGRULayer.apply(projected, weight_hh, bias_hh)[:, -1].sum().backward())
        auto = best_of(lambda: autograd_layer(layer, projected, weight_hh, bias_hh)[:, -1].sum().backward())
        single, inputs = torch.nn.GRU(1, spec.hidden, batch_first=True), torch.randn(128, spec.window, 1)

        def onednn_loop():
            for _ in range(width):
                single(inputs)[0][:, -1].sum().backward()

        onednn = best_of(onednn_loop)
        rows.append({"networks": width, "hand_written_s": hand, "autograd_s": auto, "onednn_loop_s": onednn,
                     "max_relative_gradient_error": error})  # fmt: skip
        print(rows[-1], flush=True)
    view = Table(title="one stacked GRU layer, forward + backward, batch 128, 32 steps, 1 thread (best of 5)")
    for column in ("K", "hand-written BPTT ms", "autograd ms", "autograd / hand-written", "oneDNN nn.GRU x K ms",
                   "oneDNN / autograd", "max rel. grad. error"):  # fmt: skip
        view.add_column(column, justify="right")
    for r in rows:
        view.add_row(str(r["networks"]), f"{1e3 * r['hand_written_s']:.1f}", f"{1e3 * r['autograd_s']:.1f}",
                     f"{r['autograd_s'] / r['hand_written_s']:.2f}x", f"{1e3 * r['onednn_loop_s']:.1f}",
                     f"{r['onednn_loop_s'] / r['autograd_s']:.2f}x",
                     f"{r['max_relative_gradient_error']:.1e}")  # fmt: skip
    Console(width=120).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recurrent_backward.json").write_text(json.dumps(
        {"benchmark": "recurrent_backward", "threads": 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows},
        indent=2))  # fmt: skip
    print(f"wrote {RESULTS / 'recurrent_backward.json'}")


if __name__ == "__main__":
    main()
