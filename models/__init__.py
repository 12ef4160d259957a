"""Forecasting networks: one spec per fleet, one small model per series."""

from models.forecasters import build_model, fresh_weights, init_weights
from models.spec import ModelSpec

__all__ = ["ModelSpec", "build_model", "fresh_weights", "init_weights"]
