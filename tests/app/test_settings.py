"""Settings from PERCEIVER_* variables and JSON/YAML files: parsing, validation and the messages it gives."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from reference import Reference

from app.loading import build_models
from app.settings import ModelSpec, Settings, _refuse_misspelt_variables, load_settings
from app.tasks import TASK_NAMES


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PERCEIVER_* variable from the shell running the tests leaks into these settings."""
    for name in list(os.environ):
        if name.upper().startswith("PERCEIVER_"):
            monkeypatch.delenv(name)


def test_defaults_pick_the_device_and_the_demo_profile() -> None:
    settings = Settings()
    assert settings.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert settings.models == [] and settings.demo
    assert (settings.max_text_bytes, settings.max_video_clips, settings.max_flow_frames) == (65_536, 8, 32)


def test_prefixed_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEIVER_PORT", "9001")
    monkeypatch.setenv("PERCEIVER_MAX_TEXT_BYTES", "512")
    monkeypatch.setenv("PERCEIVER_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("PERCEIVER_WARMUP", "false")
    monkeypatch.setenv("PERCEIVER_DEVICE", "cpu")
    monkeypatch.setenv("PORT", "1")  # unprefixed: not ours
    settings = Settings()
    assert (settings.port, settings.max_text_bytes, settings.max_delay_ms) == (9001, 512, 2.5)
    assert settings.warmup is False and settings.device == "cpu"


def test_null_in_the_environment_turns_an_optional_setting_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue-delay target's documented off switch works from the environment, not only from a file."""
    assert Settings().max_queue_delay_ms == 500.0
    monkeypatch.setenv("PERCEIVER_MAX_QUEUE_DELAY_MS", "null")
    assert Settings().max_queue_delay_ms is None and load_settings().max_queue_delay_ms is None
    monkeypatch.setenv("PERCEIVER_API_KEYS", "null")  # elsewhere "null" is a value: never access left open
    assert Settings().api_keys == "null"
    monkeypatch.setenv("PERCEIVER_PORT", "null")  # a setting that cannot be off says so
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_models_and_demo_tasks_are_read_as_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PERCEIVER_MODELS",
        json.dumps([{"task": "classify", "variant": "fourier", "source": "/ckpt/fourier", "max_batch_size": 8}]),
    )
    settings = Settings()
    assert settings.models == [ModelSpec(task="classify", variant="fourier", source="/ckpt/fourier", max_batch_size=8)]
    assert settings.models[0].revision == "main" and settings.models[0].dtype is None
    assert not settings.demo
    # the demo profile's tasks, with models configured (no demo profile): ignored without a word before (audit)
    monkeypatch.setenv("PERCEIVER_DEMO_TASKS", '["fill-mask", "optical-flow"]')
    with pytest.raises(ValidationError, match="demo_tasks chooses the demo profile's tasks, and models are configured"):
        Settings()
    monkeypatch.delenv("PERCEIVER_MODELS")
    assert Settings().demo_tasks == ["fill-mask", "optical-flow"]


@pytest.mark.parametrize("text", ["", "# models: to come\n"])
def test_an_empty_config_file_is_refused(tmp_path: Path, text: str) -> None:
    """It served the demo profile's random weights and answered ready (audit: a ConfigMap rendered empty)."""
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=r"serve\.yaml holds no settings; give the models to serve there"):
        load_settings(config)


def test_out_of_range_values_from_the_environment_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEIVER_MAX_TEXT_BYTES", "0")
    with pytest.raises(ValidationError, match="max_text_bytes"):
        Settings()


def assert_names_the_bad_task(error: ValidationError, where: str) -> None:
    (problem,) = error.errors()
    assert ".".join(str(part) for part in problem["loc"]) == where
    message = str(error)
    assert "unknown task 'segment'" in message
    assert f"tasks: {', '.join(TASK_NAMES)}" in message


def test_unknown_task_in_models_names_it_and_lists_the_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEIVER_MODELS", json.dumps([{"task": "segment", "source": "/ckpt"}]))
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert_names_the_bad_task(caught.value, "models.0.task")


def test_unknown_demo_task_names_it_and_lists_the_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEIVER_DEMO_TASKS", '["classify", "segment"]')
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert_names_the_bad_task(caught.value, "demo_tasks.1")


def test_every_task_name_is_accepted() -> None:
    assert Settings(demo_tasks=list(TASK_NAMES)).demo_tasks == list(TASK_NAMES)
    specs = [ModelSpec(task=name, source=f"/ckpt/{name}") for name in TASK_NAMES]
    assert [spec.task for spec in Settings(models=specs).models] == list(TASK_NAMES)


def test_the_schema_lists_the_tasks() -> None:
    schema = Settings.model_json_schema()
    demo_tasks = schema["properties"]["demo_tasks"]["anyOf"][0]
    assert demo_tasks["items"]["enum"] == list(TASK_NAMES)


def test_a_model_configured_twice_is_refused() -> None:
    twice = [ModelSpec(task="classify", variant="conv", source=source) for source in ("/a", "/b")]
    with pytest.raises(ValidationError, match="model classify/conv is configured twice"):
        Settings(models=twice)


def test_the_same_task_with_different_variants_is_fine() -> None:
    settings = Settings(
        models=[ModelSpec(task="classify", variant="conv", source="/a"), ModelSpec(task="classify", source="/b")]
    )
    assert [(m.task, m.variant) for m in settings.models] == [("classify", "conv"), ("classify", "default")]


def test_a_misspelt_model_key_is_refused_with_its_nearest_spelling() -> None:
    with pytest.raises(ValidationError, match="unknown model spec key 'max_batchsize'; did you mean 'max_batch_size'"):
        Settings(models=[{"task": "classify", "source": "/a", "max_batchsize": 4}])


@pytest.mark.parametrize(
    ("device", "dtype", "override", "expected"),
    [
        ("cpu", "auto", None, "float32"),
        ("cuda", "auto", None, "bfloat16"),
        ("cuda:1", "auto", None, "bfloat16"),
        ("cpu", "bfloat16", None, "bfloat16"),
        ("cuda", "float16", None, "float16"),
        ("cuda", "float32", "auto", "bfloat16"),  # a model's own "auto" resolves for the device
        ("cpu", "auto", "float16", "float16"),
    ],
)
def test_resolved_dtype(device: str, dtype: str, override: str | None, expected: str) -> None:
    assert Settings(device=device, dtype=dtype).resolved_dtype(override) == expected


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_settings_from_json(tmp_path: Path) -> None:
    config = {
        "port": 8123,
        "device": "cpu",
        "max_text_bytes": 100,
        "models": [{"task": "fill-mask", "source": "deepmind/language-perceiver", "dtype": "float32"}],
    }
    settings = load_settings(write(tmp_path / "serve.json", json.dumps(config)))
    assert (settings.port, settings.device, settings.max_text_bytes) == (8123, "cpu", 100)
    (model,) = settings.models
    assert (model.task, model.variant, model.source, model.dtype) == (
        "fill-mask",
        "default",
        "deepmind/language-perceiver",
        "float32",
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_settings_from_yaml(tmp_path: Path, suffix: str) -> None:
    text = """
port: 8124
dtype: bfloat16
max_batch_size: 32
models:
  - task: classify
    variant: learned
    source: deepmind/vision-perceiver-learned
    max_delay_ms: 0
  - task: optical-flow
    source: deepmind/optical-flow-perceiver
    revision: v1
"""
    settings = load_settings(write(tmp_path / f"serve{suffix}", text))
    assert (settings.port, settings.dtype, settings.max_batch_size) == (8124, "bfloat16", 32)
    assert [(m.task, m.variant, m.revision, m.max_delay_ms) for m in settings.models] == [
        ("classify", "learned", "main", 0.0),
        ("optical-flow", "default", "v1", None),
    ]


def test_load_settings_without_a_file_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEIVER_MAX_TEXT_BYTES", "300")
    assert load_settings().max_text_bytes == 300


def test_explicit_overrides_beat_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "serve.json", '{"port": 8123, "workers": 2}'), port=9000)
    assert (settings.port, settings.workers) == (9000, 2)


@pytest.mark.parametrize(("name", "text"), [("serve.json", '{"prot": 8123}'), ("serve.yaml", "prot: 8123\n")])
def test_an_unknown_key_in_the_file_is_refused_with_its_nearest_spelling(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ValueError, match="unknown config file key 'prot'; did you mean 'port'"):
        load_settings(write(tmp_path / name, text))


def test_the_environment_beats_the_file_and_the_file_beats_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env > file > defaults, as Kubernetes users expect of a ConfigMap with env overrides."""
    monkeypatch.setenv("PERCEIVER_PORT", "9002")
    monkeypatch.setenv("perceiver_max_delay_ms", "7")  # names are case-insensitive, as pydantic-settings reads them
    settings = load_settings(write(tmp_path / "serve.yaml", "port: 9001\nworkers: 3\nmax_delay_ms: 1\n"))
    assert (settings.port, settings.workers, settings.max_delay_ms) == (9002, 3, 7.0)
    assert load_settings(write(tmp_path / "serve.json", '{"port": 9001}'), port=9003).port == 9003  # flags win


def test_an_unknown_task_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(write(tmp_path / "serve.yaml", "demo_tasks: [segment]\n"))
    assert_names_the_bad_task(caught.value, "demo_tasks.0")


@pytest.mark.parametrize(
    ("arch", "task", "residual", "expected"),
    [
        ("PerceiverForOpticalFlow", "optical-flow", "auto", torch.float32),  # flow's own default
        ("PerceiverForOpticalFlow", "optical-flow", "model", None),
        ("PerceiverForMaskedLM", "fill-mask", "auto", None),
        ("PerceiverForMaskedLM", "fill-mask", "float32", torch.float32),
    ],
)
def test_a_models_residual_dtype_key_reaches_its_layers(
    references: dict[str, Reference], arch: str, task: str, residual: str, expected: torch.dtype | None
) -> None:
    """The per-model ``residual_dtype`` key, on a checkpoint saved by transformers and loaded in bf16: every
    encoder layer keeps its sums in the dtype asked for, and the model still answers in bf16."""
    spec = ModelSpec(task=task, source=str(references[arch].path), dtype="bfloat16", residual_dtype=residual)
    (loaded,) = build_models(Settings(models=[spec], device="cpu"))
    model = loaded.model
    assert model.residual_dtype is expected
    assert {layer.residual_dtype for layer in model.encoder.layers} == {expected}
    with torch.no_grad():
        out = model(**references[arch].inputs)
    assert isinstance(out.logits, torch.Tensor) and out.logits.dtype == torch.bfloat16


def test_a_revision_given_for_a_local_directory_is_said_to_be_unused(
    references: dict[str, Reference], caplog: pytest.LogCaptureFixture
) -> None:
    """A revision selects a Hub snapshot; a local directory is served as it is, and the log says so rather
    than let the operator believe v1 is what runs."""
    source = str(references["PerceiverForMaskedLM"].path)
    for revision, warned in (("v1", True), ("main", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="perceiver.loading"):
            build_models(Settings(models=[ModelSpec(task="fill-mask", source=source, revision=revision)]))
        said = [r.getMessage() for r in caplog.records if "is not checked out" in r.getMessage()]
        assert said == (
            [
                f"model fill-mask/default: revision 'v1' is not checked out: {source} is a local directory, "
                "served as it is (a revision selects a Hub snapshot; here it is only reported in the model's "
                "metadata)"
            ]
            if warned
            else []
        ), said


def test_an_unknown_residual_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ValidationError, match="'auto', 'float32' or 'model'"):
        ModelSpec(task="optical-flow", source="/a", residual_dtype="bfloat16")  # type: ignore[arg-type]


def serve_with(env: dict[str, str], *args: str) -> tuple[int, str]:
    """perceiver-serve with these settings, as a process: its exit code and what it printed."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PERCEIVER_")} | env
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=full, capture_output=True, text=True, timeout=120, check=False
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PERCEIVER_PORT": "0"}, "PERCEIVER_PORT: Input should be greater than or equal to 1"),
        ({"PERCEIVER_MAX_DELAY_MS": "inf"}, "PERCEIVER_MAX_DELAY_MS: Input should be a finite number"),
        ({"PERCEIVER_MAX_BATCH_SIZE": "100000"}, "PERCEIVER_MAX_BATCH_SIZE: Input should be less than or equal to"),
        ({"PERCEIVER_LOG_LEVEL": "verbose"}, "PERCEIVER_LOG_LEVEL: Input should be 'DEBUG'"),
        ({"PERCEIVER_DEVICE": "gpu"}, "PERCEIVER_DEVICE: String should match pattern"),
        ({"PERCEIVER_DEMO_TASKS": "[]"}, "PERCEIVER_DEMO_TASKS: List should have at least 1 item"),
        ({"PERCEIVER_MODELS": "classify-text:/x"}, "take JSON"),
        ({"PERCEIVER_API_KEYS": " , ,"}, "PERCEIVER_API_KEYS is set but holds no key"),
        (
            {"PERCEIVER_MAX_BATCHSIZE": "4"},
            "unknown setting PERCEIVER_MAX_BATCHSIZE; did you mean PERCEIVER_MAX_BATCH_SIZE?",
        ),
        ({"PERCEIVER_LAYER_NORM": "bogus"}, "PERCEIVER_LAYER_NORM='bogus': use one of torch, triton, auto"),
        ({"PERCEIVER_METRICS_AUTH": "true"}, "metrics_auth needs API keys"),
        ({"PERCEIVER_MODELS": '[{"task": "classify", "variant": "", "source": "x"}]'}, "PERCEIVER_MODELS[0].variant"),
        ({"PERCEIVER_API_KEYS_FILE": "/no/such/keys"}, "/no/such/keys: No such file or directory"),
        (
            {"PERCEIVER_API_KEYS": "sk-live-SECRET-0123", "PERCEIVER_WORKERS": "2", "PERCEIVER_API_PROCESSES": "1"},
            "workers > 1 and api_processes >= 1 do not combine",
        ),
    ],
    ids=[
        "port",
        "inf",
        "batch",
        "log-level",
        "device",
        "no-demo-task",
        "models-not-json",
        "keys",
        "misspelt",
        "kernel-switch",
        "metrics-auth",
        "empty-variant",
        "keys-file",
        "scale",
    ],
)
def test_bad_settings_stop_the_start_with_one_line_that_names_the_setting(env: dict[str, str], expected: str) -> None:
    """One JSON log line, exit 2: no traceback, and no value (a whole-settings error used to print them all, API
    keys included); keys that are set but hold none, and values that would break the server later (inf, a
    batch size of 100,000, no demo task, an unknown device), are refused here."""
    code, printed = serve_with(env)
    lines = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert code == 2 and len(printed.splitlines()) == 1, printed[-2000:]
    assert lines[0]["level"] == "ERROR" and expected in lines[0]["msg"], lines
    assert "Traceback" not in printed and "SECRET" not in printed


def test_kubernetes_service_links_and_the_kernel_switches_are_not_taken_for_misspelt_settings() -> None:
    """A Service named perceiver-serve gives every pod of its namespace PERCEIVER_SERVE_* variables."""
    links = {
        "PERCEIVER_SERVE_PORT": "tcp://10.0.0.7:8000",
        "PERCEIVER_SERVE_SERVICE_HOST": "10.0.0.7",
        "PERCEIVER_SERVE_SERVICE_PORT_GRPC": "8001",
        "PERCEIVER_SERVE_PORT_8000_TCP_ADDR": "10.0.0.7",
        "PERCEIVER_WIDE_ATTENTION": "fused",
        "PERCEIVER_PORT": "8000",
    }
    _refuse_misspelt_variables(links)
    _refuse_misspelt_variables({"PERCEIVER_HOME": "/srv", "PERCEIVER_ROOT": "/", "PERCEIVER_HOSTNAME": "a"})  # 2+ edits
    for typo, meant in (
        ("PERCEIVER_WORKER", "WORKERS"),
        ("PERCEIVER_GPRC_PORT", "GRPC_PORT"),
        ("PERCEIVER_PROT", "PORT"),
    ):
        with pytest.raises(ValueError, match=f"did you mean PERCEIVER_{meant}\\?"):
            _refuse_misspelt_variables({**links, typo: "2"})


def test_a_keys_file_with_comments_only_is_refused_and_keys_on_or_off_are_logged(tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys yet\n")
    code, printed = serve_with({"PERCEIVER_API_KEYS_FILE": str(empty)})
    assert code == 2 and "PERCEIVER_API_KEYS_FILE is set but holds no key" in printed, printed[-2000:]
    with socket.socket() as taken:  # the server builds its app, says whether keys are on, then cannot listen
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {"PERCEIVER_HOST": "127.0.0.1", "PERCEIVER_PORT": port, "PERCEIVER_DEMO_TASKS": '["classify-text"]'}
        for keys, said in (({}, "API keys off"), ({"PERCEIVER_API_KEYS": "sesame"}, "API keys on: 1 key(s)")):
            code, printed = serve_with({**env, **keys, "PERCEIVER_GRPC_PORT": "0", "PERCEIVER_WARMUP": "false"})
            messages = [json.loads(line)["msg"] for line in printed.splitlines() if line.startswith("{")]
            assert any(m.startswith(said) for m in messages), messages
