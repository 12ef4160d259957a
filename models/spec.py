"""The knobs of one fleet's networks: architecture, size, windowing and optimisation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

ARCHITECTURES = ("mlp", "lstm", "gru", "transformer")
# Fields added after checkpoints existed: left out of the fingerprint while at their defaults, so a
# run trained before they existed still resumes.
_LATER_FIELDS = (
    "heads", "grad_clip", "lr_decay", "early_stopping_patience", "early_stopping_min_delta", "precision",
)  # fmt: skip


class ModelSpec(BaseModel):
    """What every network of a run is built and trained with.

    All networks of a run share one spec; each still gets its own seed (derived from `seed` and its
    series id), its own data and its own checkpoint.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Literal["mlp", "lstm", "gru", "transformer"] = Field(
        "mlp", description="Network family: 'mlp', 'lstm', 'gru' or 'transformer' (a small encoder)."
    )
    hidden: int = Field(
        32, ge=1, le=4096, description="Width of each hidden layer (LSTM/GRU: hidden size; transformer: model width)."
    )
    layers: int = Field(2, ge=1, le=16, description="Number of hidden layers (LSTM/GRU/transformer: stacked layers).")
    heads: int = Field(4, ge=1, le=64, description="Attention heads of the transformer; must divide `hidden`.")
    window: int = Field(32, ge=1, le=4096, description="Past values the network sees per prediction.")
    horizon: int = Field(8, ge=1, le=1024, description="Future values predicted per window.")
    learning_rate: float = Field(3e-3, gt=0, le=10, description="Adam learning rate.")
    epochs_per_iteration: int = Field(5, ge=1, le=10_000, description="Epochs trained by one iteration task.")
    batch_size: int = Field(128, ge=1, le=1_000_000, description="Windows per optimiser step.")
    holdout_fraction: float = Field(
        0.1, ge=0, lt=0.9, description="Share of each series' tail held out for validation."
    )
    seed: int = Field(0, ge=0, description="Base seed; each network's seed is derived from it and its series id.")
    expanding_window: bool = Field(
        False, description="Iteration k trains on the oldest share min(1, k * expanding_start) of the training "
        "windows, so each iteration sees more data (and costs more) than the last.",
    )  # fmt: skip
    expanding_start: float = Field(
        0.25, gt=0, le=1, description="Share of the training windows iteration 1 uses when expanding_window is on."
    )

    grad_clip: float | None = Field(
        None, gt=0, description="Clip each network's gradient to this global L2 norm before every step (None: off)."
    )
    lr_decay: float = Field(
        1.0, gt=0, le=1, description="Learning rate multiplied by this after every epoch a network trains (1: constant)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop a network after this many epochs without its validation loss improving by "
        "more than early_stopping_min_delta; it keeps its weights and skips later iterations (None: off).",
    )  # fmt: skip
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest validation-loss drop that counts.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="'bf16' runs forward passes under bfloat16 autocast (meant for GPUs; weights, Adam "
        "state and losses stay float32); 'fp32' runs everything in float32.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelSpec":
        if self.architecture == "transformer" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}) for a transformer")
        return self

    def autocast(self, device: torch.device | str):
        """The autocast context a forward pass of this spec runs under on `device` (a no-op for fp32)."""
        device_type = torch.device(device).type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @contextlib.contextmanager
    def float32_math(self, device: torch.device | str):
        """While open, float32 products on a GPU stay float32 under 'fp32' (TF32 off); a no-op elsewhere.

        cuDNN's recurrent layers use TF32 by default and batched products do not, so on a GPU an
        nn.LSTM trained alone and the same network fused drifted apart by ~1e-4 in 3 iterations
        (tests/test_fused.py on an H200). Both strategies train inside this. The switches are
        process-wide and restored on leaving.
        """
        if self.precision != "fp32" or torch.device(device).type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def learning_rate_at(self, epochs_done: int) -> float:
        """The learning rate of a network's next epoch after it has trained `epochs_done` epochs."""
        return self.learning_rate * self.lr_decay**epochs_done

    def training_rows(self, available: int, iteration: int) -> int:
        """How many of a network's `available` training windows iteration `iteration` trains on.

        All of them, unless `expanding_window`: then the oldest min(1, k * expanding_start) share
        (at least one), so a backtest-like schedule grows with k whatever the total iterations.
        """
        if not self.expanding_window or available == 0:
            return available
        return max(1, min(available, math.ceil(available * self.expanding_start * iteration - 1e-9)))

    def train_windows(self, length: int) -> int:
        """Training windows a valid series of `length` points yields (before any expanding window)."""
        return max(0, length - self.holdout_points(length) - self.window - self.horizon + 1)

    def holdout_points(self, length: int) -> int:
        """Points at the end of a series of `length` held out for validation (at least one horizon)."""
        return max(self.horizon, round(self.holdout_fraction * length))

    def min_length(self) -> int:
        """Shortest series that yields one training window and one held-out target block."""
        shortest = self.window + 2 * self.horizon
        # holdout_points grows with the length, so search upward from the bound that ignores it.
        while shortest - self.holdout_points(shortest) < self.window + self.horizon:
            shortest += 1
        return shortest

    def fingerprint(self) -> str:
        """A short hash of everything that shapes a checkpoint; a resumed run must match it."""
        fields = self.model_dump()
        for name in _LATER_FIELDS:
            if fields[name] == type(self).model_fields[name].default:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def coerce(cls, value: ModelSpec | dict[str, Any] | str | None) -> ModelSpec:
        """Accept a spec, a dict of its fields, an architecture name, or None for the defaults."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(architecture=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(
            f"model must be a ModelSpec, a dict of its fields or an architecture name "
            f"({', '.join(ARCHITECTURES)}); got {type(value).__name__}"
        )
