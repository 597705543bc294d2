"""Every setting, from PERCEIVER_* environment variables and an optional JSON/YAML file (``--config``).

Two kinds: what an operator sets (the models, the device, limits, deadlines, access), and tuning knobs marked
``tuning`` (their defaults are measured: change one only with a benchmark that shows why, see
docs/performance.md). Knobs that exist only to measure something are not settings: benchmarks/knobs.py.
Figures belong in docs/performance.md, not in these descriptions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .tasks import TASK_NAMES
from .tasks.base import Limits


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def _known_task(name: str) -> str:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")
    return name


def _null_is_off(value: Any) -> Any:
    """Reads "null" from the environment as null in a file does: the setting is off. Only where a setting says
    so: a global rule would also turn, say, an API key of "null" into no key at all."""
    return None if isinstance(value, str) and value.strip().lower() == "null" else value


MAX_BATCH_SIZE = 1024  # a configured batch size past this is a typo: warm-up would run every size up to it
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Literal["auto"]
TUNING: dict[str, Any] = {"tuning": True}  # a tuning knob (json_schema_extra): README lists these apart
TaskName = Annotated[str, AfterValidator(_known_task), Field(json_schema_extra={"enum": list(TASK_NAMES)})]


def _refuse_unknown_keys(fields: dict[str, Any], data: Any, what: str) -> None:
    """A misspelt key is an error naming it and its nearest valid spelling, never silently ignored."""
    if not isinstance(data, dict):
        return
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ValueError(f"unknown {what} key {key!r}{hint}")


class ModelSpec(BaseModel):
    """One served model. ``source`` is a local checkpoint directory or a Hub repo id (resolved offline first)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        _refuse_unknown_keys(cls.model_fields, data, "model spec")
        return data

    task: TaskName
    variant: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name within the task, e.g. learned / fourier / conv for classify.",
    )
    source: str
    revision: str = "main"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    residual_dtype: Literal["auto", "float32", "model"] = Field(
        "auto",
        description="The residual sums' dtype under bf16/fp16 weights. float32: the latent stream is not rounded at "
        "every layer (closer to fp32's answers, the stream's bytes twice over); model: the weights' dtype (fastest); "
        "auto: the head's own, float32 for optical flow and model for the rest. No effect in float32.",
    )
    max_batch_size: BatchSize | None = None
    max_delay_ms: float | None = Field(None, ge=0)
    max_batch_cost: int | None = Field(None, ge=1, json_schema_extra=TUNING)


class Settings(BaseSettings):
    """Server settings. Each field is also the environment variable PERCEIVER_<FIELD NAME>."""

    # No float setting takes inf or nan: max_delay_ms=inf left a request in the queue forever.
    model_config = SettingsConfigDict(env_prefix="PERCEIVER_", extra="forbid", allow_inf_nan=False)

    host: str = Field("0.0.0.0", description="Interface to bind; `::` is every address of both IPv6 and IPv4.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="TCP port of the Open Inference Protocol's gRPC API and grpc.health.v1 (Triton's and KServe's "
        "8001), on the same host and in the same process as HTTP; 0 turns gRPC off.",
    )
    device: str = Field(
        default_factory=lambda: "cuda" if _cuda_available() else "cpu",
        pattern=r"^(cpu|cuda(:[0-9]+)?)$",
        description="Torch device for every model: cuda when available, else cpu (cpu, cuda or cuda:N).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype. auto: bfloat16 on GPU, float32 on CPU."
    )
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Served models. Empty: the demo profile (small random-init models for every task).",
    )
    demo_tasks: list[TaskName] | None = Field(
        None,
        min_length=1,
        description="Demo profile only (set with models, an error): serve just these tasks (default: all).",
    )
    max_batch_size: BatchSize = Field(
        "auto",
        description='Most requests in one forward pass. auto: measured per model at warm-up (README, "How '
        'batching works"), with a safe default when warm-up is off or the timings cannot decide. Larger batches '
        "raise throughput and latency.",
    )
    batch_latency_budget_ms: float = Field(
        500.0,
        gt=0,
        description="max_batch_size=auto never picks a batch whose forward pass takes longer than this.",
        json_schema_extra=TUNING,
    )
    max_delay_ms: float = Field(
        5.0,
        ge=0,
        description="How long the oldest queued request may wait for company before its batch is cut. "
        "0 dispatches as soon as the model is free; higher values build fuller batches at low load.",
    )
    max_queue_size: int = Field(
        256,
        ge=1,
        description="Queued requests per model before new ones get 429. A low limit refuses clients "
        "instead of having them wait too long.",
    )
    max_queue_delay_ms: Annotated[float | None, BeforeValidator(_null_is_off)] = Field(
        500.0,
        gt=0,
        description="Queue-delay target: a request whose estimated wait in its model's queue exceeds it gets 429 at "
        "once, with Retry-After from the estimate (as CoDel keeps a target for the standing queue: a long queue "
        "adds latency, not throughput). A request whose estimated finish is past its deadline always does. "
        "null turns the target off (PERCEIVER_MAX_QUEUE_DELAY_MS=null, or null in the file): served requests may "
        "then wait most of their deadline under overload "
        "(docs/reliability.md has both measured).",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline per request (504 past it). Clients may shorten it with x-request-timeout-ms. An "
        "upload whose body has not arrived by then gets 408.",
    )
    drain_timeout_s: float = Field(
        20.0,
        gt=0,
        description="After SIGTERM, how long accepted requests may take to finish before exit. Keep it below "
        "terminationGracePeriodSeconds minus the preStop sleep.",
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Request bodies above this get 413.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decoded image (or video frame) pixel cap: 413.")
    max_video_seconds: float = Field(60.0, gt=0, description="Longest accepted video; longer ones get 413.")
    max_video_frames: int = Field(1800, ge=16, description="Most frames a video may declare; more get 413.")
    max_video_clips: int = Field(
        8,
        ge=1,
        description="Most 0.64 s clips /v1/autoencode classifies in one video (clips=uniform stops here; a larger "
        "clips=N gets 413). Each clip is one forward pass item: a request costs up to this many.",
    )
    max_text_bytes: int = Field(
        65_536,
        ge=1,
        description="Longest text (UTF-8 bytes) for the text tasks; longer gets 413 before it is tokenized. Text "
        "longer than the model reads is cut into windows (fill-mask; classify-text with long_text=windows), each "
        "one forward-pass item.",
    )
    image_decoder: Literal["auto", "exact"] = Field(
        "auto",
        description="How /v1/classify decodes uploads. auto: large JPEGs decoded at reduced scale (libjpeg DCT "
        "scaling, never below twice the crop), much faster for phone photos at a small pixel difference (README, "
        '"Image decoding", has both measured). exact: bit-for-bit the reference preprocessing of transformers.',
    )
    max_files_per_request: int = Field(
        64, ge=1, description="Most files in one multipart request (several images to classify at once): 400 above."
    )
    max_flow_tiles: int = Field(24, ge=1, description="Most 368x496 windows one optical-flow pair may need (413).")
    max_flow_frames: int = Field(
        32,
        ge=2,
        description="Most frames (after the stride) of a video sent to /v1/optical-flow, checked on its header "
        "before decoding (413). A video of T frames is T - 1 pairs, each as many windows as its frame size needs.",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay CUDA graphs captured per batch size for the image and optical-flow heads (GPU only). "
        "Batches are padded to the next power of two; capture happens during warm-up. Without them the inference "
        "thread waits for the GIL around every kernel launch under HTTP load (docs/performance-history.md, H100 runs).",
        json_schema_extra=TUNING,
    )
    prepare_ahead: bool = Field(
        True,
        description="On CUDA, prepare each /v1/classify batch (nvJPEG decoding and cropping its JPEGs, on a thread and "
        "stream of their own) while the batch before it runs, instead of in turn with the forward pass. The "
        "batch runs once it is prepared and the one before has ended (docs/performance.md has both measured).",
        json_schema_extra=TUNING,
    )
    compile: Literal["off", "latent"] = Field(
        "off",
        description="latent: torch.compile each model's latent transformer (one compiled layer serves every latent "
        "layer, one graph every batch size above 1), compiled at start-up before warm-up measures anything. Same "
        "answers within rounding; start-up takes the compile (docs/performance.md has it measured, cold and with "
        "compile_cache). Needs a C compiler at run time (the image: --build-arg COMPILER=true); without one the log "
        "says why and the models run eagerly. off: eager PyTorch.",
        json_schema_extra=TUNING,
    )
    compile_cache: str | None = Field(
        None,
        description="Directory for compiled kernels (TORCHINDUCTOR_CACHE_DIR) that outlives the process: a restart "
        "with compile=latent reads them instead of compiling again. It holds code the server runs: mount it "
        "writable by the server only.",
        json_schema_extra=TUNING,
    )
    workers: int = Field(
        1,
        ge=1,
        description="Server processes sharing the port, each with its own models and batcher. Helps CPU hosts "
        "where one process cannot parse and decode uploads fast enough; on one GPU the processes time-slice the "
        "device and each batches a fraction of the traffic (slower: docs/performance-history.md), so keep 1 per GPU.",
    )
    api_processes: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="HTTP and gRPC front ends in processes of their own (parsing, validation, decoding, encoding, "
        "metrics), all handing their requests to one model process that owns the models, batchers and device "
        "(docs/front-ends.md). 0: one process does everything. auto: 0 on a CPU host (measured: "
        "docs/performance.md), and on a GPU host min(2, CPUs - 2) (0 with fewer than 3 CPUs; on an H200, 2 served "
        "1920x1080 uploads faster than 1, 4 or 8: docs/performance.md). Not with workers > 1.",
    )
    api_slab_mb: int = Field(
        256,
        ge=1,
        le=65536,
        description="Shared memory per front-end process for the payloads it hands the model process (a memfd, "
        "not /dev/shm, counted in the pod's memory once touched; sizing: docs/front-ends.md). A payload that does "
        "not fit travels through the socket instead, at some copies more in the model process "
        "(perceiver_channel_overflow_bytes_total counts them).",
        json_schema_extra=TUNING,
    )
    cpu_lanes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="CPU models: batches that may run side by side under load, the cores shared equally between "
        "them (a batch that runs alone takes them all), at most one per core. auto: 2 for a model whose "
        "max_batch_size=auto chose 1 (batching gains it nothing, so two requests side by side use the cores "
        "better), 1 for the others, which run on the inference thread: under mixed load one batch more than "
        "there are lanes may run. A number applies to every CPU model. GPU models always run one batch at a time "
        "(docs/performance-history.md has both measured).",
        json_schema_extra=TUNING,
    )
    decode_workers: int = Field(
        4, ge=1, description="Threads that decode uploads off the event loop.", json_schema_extra=TUNING
    )
    decode_processes: int = Field(
        0,
        ge=0,
        description="Decode uploads in this many processes instead of threads (0: threads). Sidesteps the GIL "
        "on many-core GPU hosts at the cost of copying decoded arrays between processes.",
        json_schema_extra=TUNING,
    )
    api_keys: str | None = Field(
        None,
        repr=False,
        description="Comma-separated API keys. When set (or api_keys_file), every endpoint but /healthz, /readyz, "
        "/v2/health/*, /metrics and the pages a browser loads first (/, /docs, /redoc, /openapi.json, /static/*) "
        "needs Authorization: Bearer <key> or "
        "X-API-Key: <key>; others get 401.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of SHA-256 hex digests of API keys, one per line (# comments allowed)."
    )
    metrics_auth: bool = Field(False, description="With API keys on, /metrics needs a key too.")
    cors_origins: str | None = Field(
        None,
        description="Comma-separated origins whose pages may call the API from a browser (CORS), e.g. "
        "https://app.example.com. None allowed by default.",
    )
    warmup: bool = Field(True, description="Run every batch-size/shape bucket once before reporting ready.")
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
    ] = Field("INFO", description="Python logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).")
    tracing: bool | None = Field(
        None,
        description="OpenTelemetry traces (needs the tracing extra), configured by the standard OTEL_* variables. "
        "Unset: on when they name an exporter (OTEL_TRACES_EXPORTER other than none, or "
        "OTEL_EXPORTER_OTLP_ENDPOINT); OTEL_SDK_DISABLED=true keeps it off. Off costs nothing.",
    )

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        seen = set()
        for spec in self.models:
            key = (spec.task, spec.variant)
            if key in seen:
                raise ValueError(f"model {spec.task}/{spec.variant} is configured twice")
            seen.add(key)
        return self

    @model_validator(mode="after")
    def _metrics_auth_needs_keys(self) -> Settings:
        if self.metrics_auth and self.api_keys is None and self.api_keys_file is None:
            raise ValueError("metrics_auth needs API keys (api_keys or api_keys_file): without any, /metrics is open")
        return self

    @model_validator(mode="after")
    def _demo_tasks_for_the_demo(self) -> Settings:
        if self.demo_tasks is not None and self.models:
            raise ValueError(
                "demo_tasks chooses the demo profile's tasks, and models are configured (no demo profile): unset "
                "demo_tasks, or models to serve the demo (it was ignored without a word)"
            )
        return self

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> Settings:
        if self.workers > 1 and self.api_processes not in (0, "auto"):
            raise ValueError(
                "workers > 1 and api_processes >= 1 do not combine: workers copies the models into every process, "
                "api_processes keeps one copy behind several front ends; choose one"
            )
        return self

    def front_end_processes(self, cores: int | None = None) -> int:
        """api_processes as decided: 0 (one process) or the count of front-end processes."""
        if self.api_processes != "auto":
            return int(self.api_processes)
        if self.workers > 1 or not self.device.startswith("cuda"):
            return 0
        usable = cores or len(os.sched_getaffinity(0))  # the CPUs this process may run on, not the machine's
        return min(2, usable - 2) if usable >= 3 else 0

    @property
    def demo(self) -> bool:
        return not self.models

    def limits(self) -> Limits:
        """What decoding may accept, as the tasks see it."""
        fields = type(self).model_fields
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits) if f.name in fields})

    def resolved_dtype(self, override: str | None = None) -> str:
        choice = override or self.dtype
        if choice == "auto":
            return "bfloat16" if self.device.startswith("cuda") else "float32"
        return choice


def tuning_knobs(model: type[BaseModel]) -> list[str]:
    """The fields of ``model`` marked ``tuning``: README lists them apart from what an operator sets."""
    return [name for name, f in model.model_fields.items() if (f.json_schema_extra or {}) == TUNING]


# PERCEIVER_* variables that are not settings but are meant: perceiver_core's kernel switches. Kubernetes also
# sets PERCEIVER_SERVE_SERVICE_HOST, PERCEIVER_SERVE_PORT=tcp://... for a Service named perceiver-serve.
KERNEL_SWITCHES = ("PERCEIVER_WIDE_ATTENTION", "PERCEIVER_LAYER_NORM")
SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT)(_\w+)?$|_PORT_\d+_(TCP|UDP|SCTP)(_\w+)?$")


def _one_edit(a: str, b: str) -> bool:
    """Whether a and b differ by at most one insertion, deletion, substitution or swap of neighbours."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    swapped = a[first : first + 2] == b[first : first + 2][::-1] and a[first + 2 :] == b[first + 2 :]
    return a[first + 1 :] == b[first + 1 :] or a[first + 1 :] == b[first:] or a[first:] == b[first + 1 :] or swapped


def _refuse_misspelt_variables(environment: Mapping[str, str]) -> None:
    """A PERCEIVER_* variable that no setting reads but that is one typo from one (PERCEIVER_MAX_BATCHSIZE) is
    refused with the right spelling, as a misspelt key of the config file is; it used to be ignored without a
    word. Other PERCEIVER_* names (a Service's links, the kernel switches) are left alone."""
    names = [name.upper() for name in Settings.model_fields]
    for variable in environment:
        upper = variable.upper()
        if not upper.startswith("PERCEIVER_") or upper in KERNEL_SWITCHES or SERVICE_LINK.search(upper):
            continue
        name = upper.removeprefix("PERCEIVER_")
        near = next((n for n in names if _one_edit(name, n)), None)
        if near is not None and near != name:
            raise ValueError(f"unknown setting {variable}; did you mean PERCEIVER_{near}?")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Explicit overrides (command-line flags) > PERCEIVER_* environment > the JSON/YAML file > defaults."""
    values: dict[str, Any] = {}
    if config_file is not None:
        text = Path(config_file).read_text()
        if str(config_file).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
            if values is None:  # empty, or comments alone: a config that lost its content (an empty ConfigMap)
                raise ValueError(
                    f"{config_file} holds no settings; give the models to serve there (models:), or leave out "
                    "--config to serve the demo profile (it served the demo's random weights without a word)"
                )
        else:
            values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{config_file}: expected a mapping of settings, got {type(values).__name__}")
    _refuse_unknown_keys(dict(Settings.model_fields), values, "config file")
    _refuse_misspelt_variables(os.environ)
    # env > file > defaults, as with a Kubernetes ConfigMap plus env overrides: a key set in the environment
    # is dropped from the file's values, which would otherwise win (init arguments beat the environment).
    environment = {name.upper() for name in os.environ}
    values = {k: v for k, v in values.items() if f"PERCEIVER_{k.upper()}" not in environment}
    return Settings(**{**values, **overrides})
