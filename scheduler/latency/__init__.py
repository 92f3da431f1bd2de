"""Latency model: step time of a batch for (model, GPU, TP), from profiles or the roofline."""

from scheduler.latency.model import (
    GemmTable,
    LatencyModel,
    kv_transfer_time,
    prefill_pairs,
    roofline_model,
)

__all__ = ["GemmTable", "LatencyModel", "kv_transfer_time", "prefill_pairs", "roofline_model", "latency_for"]


def latency_for(model, gpu, tp: int) -> LatencyModel:
    """The best model for the triple: profiled tables when they cover it, the roofline otherwise."""
    from scheduler.latency.profiles import profiled_model

    return profiled_model(model, gpu, tp) or roofline_model(model, gpu, tp)
