"""Ways to run the fused LSTM's time steps on a GPU, side by side: the measurement issue #5's LSTM >= 20x needs next.

On an H200 the fused LSTM's eager steps took 1.6-2.1 s of its 3.4 s (`benchmarks.fused_phases`): each
time step is ~10 small kernels forward and ~20 backward over gates of up to 1660 x 128 x 128 floats. One
training step (forward, MSE loss, backward) of K stacked two-layer LSTM forecasters (32 wide, window
32, batch 128) is timed four ways:
  - eager: models.stacked's steps, as the fused engine ran them on a GPU before the Triton layer;
  - cell: each time step's cell under torch.compile (dynamic shapes): the gates' elementwise work
    becomes one generated kernel forward and one backward;
  - layer: a layer's whole loop over time under torch.compile;
  - triton: models/gpu_recurrent.py's layer (what the engine runs on a GPU): one Triton kernel per
    layer each way, every time step inside it.
For each: the first call's seconds (compilation included), the best of R steps after it, and the
largest gradient difference from eager. On a CPU the stacked layer runs its eager steps too (the
compiled C++ layer is switched off here), so the script dry-runs anywhere with a compiler (but for
"triton", which needs a GPU).
Run: `python -m benchmarks.gpu_recurrent_step [--device cuda] [--networks 256 1660] [--repeats 5]
[--ways eager cell layer triton]`; writes benchmarks/results/gpu_recurrent_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models import ModelSpec, build_model, gpu_recurrent
from models.stacked import StackedLSTM, stack

RESULTS = Path(__file__).with_name("results")


def lstm_cell(step, h, c, weight_hh):
    """One LSTM time step of K networks: step (K, batch, 4H) holds the projected input and both biases."""
    gates = torch.baddbmm(step, h, weight_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def first_cell(step):
    """The first time step, from a zero state."""
    i, _, g, o = step.chunk(4, dim=-1)
    c = torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class CellCompiledLSTM(StackedLSTM):
    """StackedLSTM whose time steps each run one torch.compile'd cell."""

    cell = first = None

    def run_layer(self, projected, weight_hh, bias_hh):
        if CellCompiledLSTM.cell is None:
            CellCompiledLSTM.cell = torch.compile(lstm_cell, dynamic=True)
            CellCompiledLSTM.first = torch.compile(first_cell, dynamic=True)
        cell, first = CellCompiledLSTM.cell, CellCompiledLSTM.first  # from the class: plain functions, unbound
        h = c = None
        outputs = []
        for step in projected.unbind(1):
            h, c = first(step) if h is None else cell(step, h, c, weight_hh)
            outputs.append(h)
        return outputs


class LayerCompiledLSTM(StackedLSTM):
    """StackedLSTM whose loop over time is one torch.compile'd function per layer call."""

    compiled = None

    def run_layer(self, projected, weight_hh, bias_hh):
        if LayerCompiledLSTM.compiled is None:
            LayerCompiledLSTM.compiled = torch.compile(StackedLSTM.run_layer, dynamic=True)
        return LayerCompiledLSTM.compiled(self, projected, weight_hh, bias_hh)


WAYS = {"eager": StackedLSTM, "cell": CellCompiledLSTM, "layer": LayerCompiledLSTM, "triton": StackedLSTM}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(way: str, networks: int, device: str, repeats: int, reference: list | None) -> dict:
    spec = ModelSpec(architecture="lstm", hidden=32, layers=2, window=32, horizon=8)
    generator = torch.Generator().manual_seed(0)
    template = build_model(spec, generator)
    model = stack("lstm", [build_model(spec, generator) for _ in range(networks)], template)
    model.__class__ = WAYS[way]
    # The eager steps on a CPU too (models/native.py is the CPU's own path); "triton" is the layer the
    # engine runs on a GPU (models/gpu_recurrent.py).
    model.use_compiled = way == "triton"
    if way == "triton" and not gpu_recurrent.usable(torch.zeros(1, device=device)):
        raise RuntimeError(f"models.gpu_recurrent's layer does not run on {device}")
    model = model.to(device)
    x = torch.randn(networks, 128, spec.window, generator=generator).to(device)
    y = torch.randn(networks, 128, spec.horizon, generator=generator).to(device)

    def step() -> float:
        synchronize(device)
        started = time.perf_counter()
        model.grads.zero_()
        ((model(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
        synchronize(device)
        return time.perf_counter() - started

    first = step()
    best = min(step() for _ in range(repeats))
    grads = model.grads.detach().cpu()
    difference = None if reference is None else float((grads - reference[0]).abs().max())
    return {"way": way, "networks": networks, "device": device, "first_call_s": first, "best_step_ms": best * 1e3,
            "max_grad_difference_from_eager": difference, "grads": grads}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", type=int, nargs="+", default=[256, 1660])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for networks in args.networks:
        reference = None
        for way in args.ways:
            try:
                row = measure(way, networks, args.device, args.repeats, reference)
            except Exception as exc:  # a way that cannot compile here is reported, and the others still run
                row = {"way": way, "networks": networks, "device": args.device, "error": f"{type(exc).__name__}: {exc}"}
            if way == "eager" and "grads" in row:
                reference = [row["grads"]]
            row.pop("grads", None)
            rows.append(row)
            print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gpu_recurrent_step_{args.device.replace(':', '')}.json"
    path.write_text(json.dumps({"benchmark": "gpu_recurrent_step", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "torch": torch.__version__, "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
