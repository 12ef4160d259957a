"""What encoding a fused group's checkpoints costs the training thread: bodies in parts against joined bytes.

`tasks.storage.checkpoint_bodies` encodes N networks' checkpoints at once (default: 1660 fresh
two-layer LSTMs of the default spec, with Adam state, ~170 KB each) and gives each body as two parts,
its header and a view of its tensors' row of one matrix, which `write_checkpoint_body` writes as
they are. This times, alternated R times in one process (the fastest kept, every timing recorded):
  - parts: checkpoint_bodies as the engine calls it;
  - joined: the same, each body then joined into one bytes object (what a caller that needs bytes,
    or the encoder before it gave parts, pays: a copy of every tensor with the GIL held);
  - checksum: SHA-256 over each body's parts, as the writer threads take it (hashlib releases the GIL).
Prints a table and writes benchmarks/results/checkpoint_encoding.json.
Run: `python -m benchmarks.checkpoint_encoding [--architecture lstm] [--networks 1660] [--repeats 4]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from models import ModelSpec, build_model, fresh_weights
from models.stacked import StackedAdam, stack
from tasks.allocator import keep_freed_memory
from tasks.fused import _stacked_tensors
from tasks.storage import checkpoint_bodies

RESULTS = Path(__file__).with_name("results")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="lstm")
    parser.add_argument("--networks", type=int, default=1660)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()  # as on a Dask worker
    spec = ModelSpec(architecture=args.architecture)
    template = build_model(spec)
    generators = [torch.Generator().manual_seed(k) for k in range(args.networks)]
    stacked = stack(spec.architecture, [fresh_weights(template, g) for g in generators], template)
    adam_layout = torch.optim.Adam(template.parameters(), lr=spec.learning_rate).state_dict()
    tensors = _stacked_tensors(stacked, StackedAdam(stacked, lr=spec.learning_rate), generators, adam_layout)
    own = [{"iteration": 1, "metrics": {"train_loss": 0.1, "val_loss": 0.2 + k}, "scale": {"mean": 0.0, "std": 1.0}}
           for k in range(args.networks)]  # fmt: skip

    def parts() -> float:
        started = time.perf_counter()
        checkpoint_bodies(own, tensors)
        return time.perf_counter() - started

    def joined() -> float:
        started = time.perf_counter()
        [b"".join(body) for body in checkpoint_bodies(own, tensors)]
        return time.perf_counter() - started

    bodies = checkpoint_bodies(own, tensors)
    size = sum(len(part) for part in bodies[0])

    def checksum() -> float:
        started = time.perf_counter()
        for body in bodies:
            digest = hashlib.sha256()
            for part in body:
                digest.update(part)
        return time.perf_counter() - started

    ways = {"parts": parts, "joined": joined, "checksum": checksum}
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            timings[name].append(way())
    view = Table(title=f"checkpoints of {args.networks} {args.architecture} networks ({size / 1e3:.0f} KB each), "
                       f"fastest of {args.repeats} alternated")  # fmt: skip
    for column in ("way", "seconds", "all timings"):
        view.add_column(column, justify="right")
    for name, seconds in timings.items():
        view.add_row(name, f"{min(seconds):.3f}", " ".join(f"{s:.3f}" for s in seconds))
    Console(width=120).print(view)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "checkpoint_encoding.json"
    path.write_text(json.dumps({"benchmark": "checkpoint_encoding", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "architecture": args.architecture, "networks": args.networks, "body_bytes": size,
                                "timings_s": timings}, indent=2))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
