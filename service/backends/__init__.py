"""Inference backends: each turns a feature matrix into probabilities or predicted values."""

from __future__ import annotations

from service.backends.base import InferenceBackend
from service.backends.loader import load_backend

__all__ = ["InferenceBackend", "load_backend"]
