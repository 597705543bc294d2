"""Triton's extensions to the protocol that its tools need: model configuration and statistics.

perf_analyzer, model_analyzer and Triton's clients read a model's configuration (``GET
/v2/models/{m}/config``, the ModelConfig RPC) before they send anything, and its statistics (``GET
/v2/models/{m}/stats``, ModelStatistics) to split latency into queue and compute. Both are answered in
Triton's JSON form from the engine; the gRPC front end sends the same content as Triton's messages.

Triton's config counts dimensions without the batch (``max_batch_size`` > 0): a v2 input of shape [-1] (one
element per row) is ``dims: [1]`` there, and the adapters take [N, 1] for it.
"""

from __future__ import annotations

from typing import Any

from ..engine import Duration, Engine
from .adapters import ADAPTERS, TensorSpec

VERSION = "1"

DATA_TYPES = {"BYTES": "TYPE_STRING"}  # every other datatype is TYPE_<name> (FP32 -> TYPE_FP32)


def data_type(datatype: str) -> str:
    return DATA_TYPES.get(datatype, f"TYPE_{datatype}")


def _dims(spec: TensorSpec) -> list[int]:
    return list(spec.shape[1:]) or [1]


def model_config(engine: Engine, name: str, max_rows: int) -> dict[str, Any]:
    """The model's configuration as Triton writes it (config.pbtxt's fields, in JSON)."""
    adapter = ADAPTERS[engine.task.name]
    policy = engine.policy
    return {
        "name": name,
        "platform": "pytorch",
        "backend": "perceiver",
        "max_batch_size": max_rows,  # rows per request; the forward passes batch up to the preferred size
        "input": [
            {"name": s.name, "data_type": data_type(s.datatype), "dims": _dims(s), "optional": s.optional}
            for s in adapter.inputs
        ],
        "output": [{"name": s.name, "data_type": data_type(s.datatype), "dims": _dims(s)} for s in adapter.outputs],
        "dynamic_batching": {
            "preferred_batch_size": [policy.max_batch_size],
            "max_queue_delay_microseconds": int(policy.max_delay_ms * 1000),
        },
        "instance_group": [{"name": name, "kind": "KIND_GPU" if engine.device.startswith("cuda") else "KIND_CPU"}],
        "parameters": {"task": {"string_value": engine.task.name}, "weights": {"string_value": engine.weights}},
    }


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


async def model_statistics(engine: Engine, name: str) -> dict[str, Any]:
    """The model's statistics since start-up, as Triton's statistics extension gives them (asked of the model
    process when this is a front-end process)."""
    stats = await engine.statistics_now()
    zero = Duration()
    return {
        "name": name,
        "version": VERSION,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success),
            "fail": _duration(stats.fail),
            "queue": _duration(stats.queue),
            "compute_input": _duration(stats.compute_input),
            "compute_infer": _duration(stats.compute_infer),
            "compute_output": _duration(stats.compute_output),
            "cache_hit": _duration(zero),
            "cache_miss": _duration(zero),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(Duration(passes.count, 0)),
                "compute_infer": _duration(passes),
                "compute_output": _duration(Duration(passes.count, 0)),
            }
            for size, passes in sorted(stats.batches.items())
        ],
        "memory_usage": [],
    }
