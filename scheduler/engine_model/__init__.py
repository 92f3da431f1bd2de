"""vLLM-like engine model: continuous batching, chunked prefill, paged KV, preemption, timed by the latency model."""

from scheduler.engine_model.model import EngineModel, Seq, Span, StepResult

__all__ = ["EngineModel", "Seq", "Span", "StepResult"]
