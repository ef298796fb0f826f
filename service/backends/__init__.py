"""Inference backends: each turns a float32 feature matrix into class probabilities."""

from __future__ import annotations

from service.backends.base import InferenceBackend
from service.backends.loader import load_backend

__all__ = ["InferenceBackend", "load_backend"]
