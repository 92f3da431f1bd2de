"""Profiled latency tables (filled in by the latency-fit work). Returns None when no profile covers a triple."""

from __future__ import annotations

from scheduler.config.models import GPUSpec, ModelSpec
from scheduler.latency.model import LatencyModel


def profiled_model(model: ModelSpec, gpu: GPUSpec, tp: int) -> LatencyModel | None:
    return None
