"""Latency model: step time of a batch for (model, GPU, TP), from profiles or the roofline."""

from collections.abc import Callable
from functools import partial

from scheduler.latency.model import (
    GemmTable,
    LatencyModel,
    kv_link,
    kv_transfer_between,
    kv_transfer_time,
    prefill_pairs,
    roofline_model,
)

__all__ = ["GemmTable", "LatencyModel", "kv_link", "kv_transfer_between", "kv_transfer_time", "latency_factory",
           "latency_for", "prefill_pairs", "roofline_model"]


def latency_for(model, gpu, tp: int) -> LatencyModel:
    """The best model for the triple: profiled tables when they cover it, the roofline otherwise."""
    from scheduler.latency.profiles import profiled_model

    return profiled_model(model, gpu, tp) or roofline_model(model, gpu, tp)


def latency_factory(config) -> Callable[..., LatencyModel]:
    """How ``config``'s instances are timed: (model, GPU, TP) -> latency model -- the live profile the config
    names (measured on one engine by `llmsched profile`, applied to every pool), else ``latency_for``. One
    place: the simulator's engines and the routers' and scalers' cost models time the same config alike."""
    if config.latency_profile:
        from scheduler.profile import latency_from_profile

        return partial(latency_from_profile, config.latency_profile)
    return latency_for
