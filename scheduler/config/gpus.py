"""GPU catalog: public spec-sheet numbers for the GPU types configs can name without spelling them out.

Plain data (no pydantic import, so ``models.py`` can read it without a cycle); ``GPUSpec.from_catalog`` turns an
entry into a validated spec. A config's ``gpus:`` section may name a catalog key with ``{}`` (or a partial
mapping of overrides, e.g. ``count``), or describe a GPU in full. :func:`nodes_for` packs instances onto a type's
nodes: the one rule config load, the planner and the KubeRay worker-group sizing (``scheduler.deploy.autoscale``)
count nodes by.

Sources (dense, i.e. without 2:4 sparsity; fp16/bf16 tensor-core peak):

* A100-80GB SXM: NVIDIA A100 datasheet -- 80 GB HBM2e, 2,039 GB/s, 312 TFLOP/s, NVLink 600 GB/s bidirectional.
* H100-80GB SXM: NVIDIA H100 datasheet -- 80 GB HBM3, 3,350 GB/s, 989 TFLOP/s, NVLink 900 GB/s bidirectional.
* H200 SXM: NVIDIA H200 datasheet -- 141 GB HBM3e, 4,800 GB/s, 989 TFLOP/s (the H100's Hopper die), NVLink 900 GB/s
  bidirectional. Measured on one here (2026-12-04, ``bench/bench_gpu_kernels.py``): 139.8 GiB visible, device copy
  2.09 TB/s each way (4.2 TB/s read + write), pinned host <-> device 55 GB/s each way.
* A40: NVIDIA A40 datasheet -- 48 GB GDDR6, 696 GB/s, 149.7 TFLOP/s, NVLink bridge 112.5 GB/s bidirectional.
* L4: NVIDIA L4 datasheet -- 24 GB GDDR6, 300 GB/s, 121 TFLOP/s, no NVLink (PCIe Gen4 x16, 64 GB/s bidirectional).

``interconnect_gbps`` is the one-direction GPU-to-GPU bandwidth (half the bidirectional figure), which is what a
ring all-reduce sees per link.

NOTE: ``price_per_hour`` values are ASSUMPTIONS -- plausible 2024 on-demand cloud prices per GPU-hour (from
public list prices of GPU clouds, which vary by 2-3x between providers and regions). Override them per config
(``gpus: {a100: {price_per_hour: 1.8}}``) for capacity planning with your own contract prices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GPU_CATALOG: dict[str, dict[str, Any]] = {
    "a100": {
        "name": "A100-80GB",
        "memory_gib": 80.0,
        "fp16_tflops": 312.0,
        "hbm_gbps": 2039.0,
        "interconnect_gbps": 300.0,
        "network_gbps": 25.0,  # 200 Gb/s InfiniBand HDR per GPU (DGX A100)
        "price_per_hour": 2.50,  # ASSUMPTION
    },
    "h100": {
        "name": "H100-80GB",
        "memory_gib": 80.0,
        "fp16_tflops": 989.0,
        "hbm_gbps": 3350.0,
        "interconnect_gbps": 450.0,
        "network_gbps": 50.0,  # 400 Gb/s InfiniBand NDR per GPU (DGX H100)
        "price_per_hour": 4.50,  # ASSUMPTION
    },
    "h200": {
        "name": "H200",
        "memory_gib": 141.0,
        "fp16_tflops": 989.0,
        "hbm_gbps": 4800.0,
        "interconnect_gbps": 450.0,
        "network_gbps": 50.0,  # 400 Gb/s InfiniBand NDR per GPU (HGX H200)
        "price_per_hour": 5.50,  # ASSUMPTION
    },
    "a40": {
        "name": "A40",
        "memory_gib": 48.0,
        "fp16_tflops": 149.7,
        "hbm_gbps": 696.0,
        "interconnect_gbps": 56.0,  # NVLink bridge pairs; beyond 2 GPUs the link is PCIe
        "network_gbps": 12.5,  # 100 Gb/s Ethernet, typical
        "price_per_hour": 0.80,  # ASSUMPTION
    },
    "l4": {
        "name": "L4",
        "memory_gib": 24.0,
        "fp16_tflops": 121.0,
        "hbm_gbps": 300.0,
        "interconnect_gbps": 32.0,  # PCIe Gen4 x16, one direction
        "network_gbps": 12.5,
        "price_per_hour": 0.70,  # ASSUMPTION
    },
    # Pseudo-GPU for the tiny local model on the vLLM CPU build (tests, laptops). Rough numbers for a few
    # shared x86 cores: calibrate with `llmsched profile` before reading anything into its absolute timings.
    "cpu": {
        "name": "cpu",
        "memory_gib": 4.0,
        "fp16_tflops": 0.2,
        "hbm_gbps": 20.0,
        "interconnect_gbps": 10.0,
        "network_gbps": 1.0,
        "network_latency_s": 1e-4,
        "price_per_hour": 0.0,
        "mfu": 0.3,
        "mbu": 0.5,
        "step_overhead_s": 5e-3,  # Python-side scheduling dominates a tiny model's step
    },
}

# Other spellings accepted for catalog keys.
GPU_ALIASES: dict[str, str] = {
    "a100-80gb": "a100",
    "a100_80gb": "a100",
    "h100-80gb": "h100",
    "h100_80gb": "h100",
    "h100-sxm": "h100",
    "h200-141gb": "h200",
    "h200-sxm": "h200",
}


def catalog_key(name: str) -> str | None:
    """The catalog key for ``name`` (case-insensitive, aliases resolved), or ``None``."""
    n = name.lower()
    n = GPU_ALIASES.get(n, n)
    return n if n in GPU_CATALOG else None


def catalog_names() -> list[str]:
    """Catalog keys, sorted (for error messages)."""
    return sorted(GPU_CATALOG)


def nodes_for(tps: Sequence[int], gpus_per_node: int) -> int:
    """Nodes of ``gpus_per_node`` GPUs that hold instances of these TP degrees (each instance on one node: its
    placement group is STRICT_PACK).

    First-fit decreasing: optimal when every TP divides the node (the usual 1/2/4/8), a tight bound otherwise
    (TP 3 on 8-GPU nodes: 2 instances per node, not 8/3).

    Raises:
        ValueError: an instance needs more GPUs than a node has, or ``gpus_per_node`` < 1.
    """
    if not tps:
        return 0
    if gpus_per_node < 1:
        raise ValueError(f"gpus per worker node must be >= 1, got {gpus_per_node}")
    free: list[int] = []  # free GPUs per opened node that has any, in opening order (first fit)
    full = 0  # opened nodes with none left: not scanned again (config load: 10,000 TP-1 instances 0.25 s -> 6 ms)
    for tp in sorted(tps, reverse=True):
        if tp > gpus_per_node:
            raise ValueError(f"an instance with tp {tp} does not fit a worker node of {gpus_per_node} GPUs")
        for i, f in enumerate(free):
            if f >= tp:
                free[i] -= tp
                break
        else:
            free.append(gpus_per_node - tp)
            i = len(free) - 1
        if not free[i]:
            del free[i]
            full += 1
    return full + len(free)
