"""Deployment artefacts, checked with the tools this ecosystem uses (no Docker engine or cluster here)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.metrics import Metrics
from app.settings import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["cpu", "gpu", "gpu-keda"]
WORKFLOWS = ROOT / ".github" / "workflows"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The copy `make install` put next to this Python (pinned by the lock), else one on the PATH."""
    found = str(BIN / name) if (BIN / name).exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (`make install` puts it in .venv/bin)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT)


def render(kustomization: Path) -> list[dict[str, Any]]:
    result = run(tool("kubectl"), "kustomize", str(kustomization))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered(overlay: str) -> list[dict[str, Any]]:
    return render(DEPLOY / "overlays" / overlay)


def validate_strictly(docs: list[dict[str, Any]], out: Path) -> subprocess.CompletedProcess[str]:
    out.write_text(yaml.safe_dump_all(docs))
    return run(tool("kubernetes-validate"), "--strict", str(out))


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (only,) = (d for d in docs if d["kind"] == kind)
    return only


def dockerfile() -> tuple[list[str], dict[str, str], str]:
    """ENTRYPOINT (exec form), the runtime stage's ENV, and USER, as written in the Dockerfile."""
    runtime = _runtime_stage()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", runtime, re.M).group(1))  # type: ignore[union-attr]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", runtime, re.M):
        env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    user = re.search(r"^USER (\S+)$", runtime, re.M).group(1)  # type: ignore[union-attr]
    return entrypoint, env, user


def _runtime_stage() -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return text[text.index("AS runtime") :]


def image_ports() -> dict[str, int]:
    """The ports the image serves on (its ENV), by the names deploy/ gives them."""
    _, env, _ = dockerfile()
    return {"http": int(env["PERCEIVER_PORT"]), "grpc": int(env["PERCEIVER_GRPC_PORT"])}


def test_hadolint_finds_no_errors() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "error", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_spec() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    result = validate_strictly(docs, tmp_path / f"{overlay}.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds
    assert ("ScaledObject" in kinds) != ("HorizontalPodAutoscaler" in kinds)


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_hardening_probes_and_volumes(overlay: str) -> None:
    pod = _deployment(rendered(overlay))["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/models", "/tmp"}
    assert pod["enableServiceLinks"] is False  # a Service named perceiver-grpc would set PERCEIVER_GRPC_PORT
    if overlay.startswith("gpu"):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] and pod["tolerations"]


# HTTP and gRPC: the same numbers in the image, compose, the pod, its probes, the Service and the NetworkPolicy.


def test_the_image_serves_and_exposes_the_servers_default_ports() -> None:
    ports = image_ports()
    assert ports == {"http": Settings.model_fields["port"].default, "grpc": Settings.model_fields["grpc_port"].default}
    assert ports["grpc"] == 8001  # Triton's and KServe's gRPC port, which their clients and tools assume
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", _runtime_stage(), re.M) for p in line.split()}
    assert exposed == set(ports.values())
    healthcheck = re.search(r"^HEALTHCHECK .*$", _runtime_stage(), re.M)
    assert healthcheck and f"os.environ.get('PERCEIVER_PORT', '{ports['http']}')" in healthcheck.group(0)


def test_the_image_healthcheck_asks_the_port_the_server_was_given() -> None:
    """It asked 127.0.0.1:8000 whatever PERCEIVER_PORT said: a container moved to another port was unhealthy."""
    command = json.loads(re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", _runtime_stage(), re.M).group(1))  # type: ignore[union-attr]
    assert command[0] == "python3"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            for port, healthy in ((server.server_address[1], True), (_closed_port(), False)):
                env = {**os.environ, "PERCEIVER_PORT": str(port)}
                done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=60)
                assert (done.returncode == 0) == healthy, (port, done.stderr[-500:])
        finally:
            server.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_compose_publishes_every_port_the_image_serves_on() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ports = image_ports()
    for name in ("perceiver", "perceiver-cpu"):  # both take x-server's ports; neither may move the server's
        service = compose["services"][name]
        assert {tuple(map(int, p.split(":"))) for p in service["ports"]} == {(p, p) for p in ports.values()}
        env = service["environment"]
        assert int(env.get("PERCEIVER_PORT", ports["http"])) == ports["http"]
        assert int(env.get("PERCEIVER_GRPC_PORT", ports["grpc"])) == ports["grpc"]


def _settings_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """What the server reads: the ConfigMap, then the container's own env over it."""
    container = _deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    (config_ref,) = container["envFrom"]
    config = next(d for d in docs if d["metadata"]["name"] == config_ref["configMapRef"]["name"])
    return {**config["data"], **{e["name"]: e["value"] for e in container.get("env", [])}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_port_is_served_probed_routed_and_allowed(overlay: str) -> None:
    docs = rendered(overlay)
    ports = image_ports()
    container = _deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    env = _settings_env(docs)
    assert int(env.get("PERCEIVER_PORT", ports["http"])) == ports["http"]
    assert int(env.get("PERCEIVER_GRPC_PORT", ports["grpc"])) == ports["grpc"]
    # Readiness: grpc.health.v1 for the whole server (no service name), on the number (the probe takes no port
    # names). Start-up: /readyz, so that a load that never ends restarts the pod. Liveness: /healthz over HTTP,
    # which answers while models load.
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc"]}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    service = of_kind(docs, "Service")["spec"]["ports"]
    by_target = {p["targetPort"]: p for p in service}
    assert set(by_target) == set(ports)
    assert by_target["grpc"]["port"] == ports["grpc"] and by_target["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert by_target["http"]["port"] == 80 and "appProtocol" not in by_target["http"]

    policy = of_kind(docs, "NetworkPolicy")["spec"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == set(ports.values())
    # Prometheus scrapes /metrics over HTTP: the ServiceMonitor names the Service port that reaches it.
    (endpoint,) = of_kind(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert next(p for p in service if p["name"] == endpoint["port"])["targetPort"] == "http"


def test_strict_validation_refuses_a_named_grpc_probe_port_and_an_unknown_service_field(tmp_path: Path) -> None:
    """The validator is live for the gRPC fields: the kubelet's gRPC probe takes a port number only."""
    docs = rendered("gpu")
    _deployment(docs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    grpc = next(p for p in of_kind(docs, "Service")["spec"]["ports"] if p["name"] == "grpc")
    grpc["appProtocl"] = grpc.pop("appProtocol")
    result = validate_strictly(docs, tmp_path / "broken.yaml")
    assert result.returncode == 1
    for error in ("readinessProbe.grpc.port: 'grpc' is not of type 'integer'", "'appProtocl' was unexpected"):
        assert error in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_http_only_component_turns_grpc_off_and_probes_readiness_over_http(tmp_path: Path) -> None:
    """PERCEIVER_GRPC_PORT=0 and nothing left that expects gRPC: a readiness probe still on the gRPC port would
    keep every pod unready."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "overlays" / "gpu", tmp_path)],
                "components": [os.path.relpath(DEPLOY / "components" / "http-only", tmp_path)],
            }
        )
    )
    docs, grpc_docs = render(tmp_path), rendered("gpu")
    result = validate_strictly(docs, tmp_path / "http-only.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    ports = image_ports()

    env = _settings_env(docs)
    assert env["PERCEIVER_GRPC_PORT"] == "0"
    values = {k.removeprefix("PERCEIVER_").lower(): v for k, v in env.items() if k.startswith("PERCEIVER_")}
    assert Settings(**{**values, "models": json.loads(values["models"])}).grpc_port == 0

    container = _deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    grpc_container = _deployment(grpc_docs)["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [p for p in grpc_container["ports"] if p["name"] == "http"]
    readiness = {k: v for k, v in grpc_container["readinessProbe"].items() if k != "grpc"}
    assert container["readinessProbe"] == {**readiness, "httpGet": {"path": "/readyz", "port": "http"}}
    differing = ("ports", "readinessProbe", "envFrom")  # envFrom: the ConfigMap's name holds a hash of its data
    assert {k: v for k, v in container.items() if k not in differing} == {
        k: v for k, v in grpc_container.items() if k not in differing
    }
    assert [p["targetPort"] for p in of_kind(docs, "Service")["spec"]["ports"]] == ["http"]
    policy = of_kind(docs, "NetworkPolicy")["spec"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [ports["http"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_fits_inside_the_termination_grace_period(overlay: str) -> None:
    """A rollout must not cut requests: drain timeout < terminationGracePeriodSeconds - preStop sleep."""
    docs = rendered(overlay)
    pod = _deployment(docs)["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    drain = float(config.get("PERCEIVER_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
    assert drain < grace - pre_stop, f"drain {drain}s must be < {grace}s - {pre_stop}s"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    stop_grace = int(compose["x-server"]["stop_grace_period"].rstrip("s"))
    compose_drain = float(compose["x-server"]["environment"]["PERCEIVER_DRAIN_TIMEOUT_S"])
    assert compose_drain < stop_grace


def test_configmap_settings_are_valid_server_settings() -> None:
    config = next(d for d in rendered("gpu") if d["kind"] == "ConfigMap")["data"]
    values = {k.removeprefix("PERCEIVER_").lower(): v for k, v in config.items()}
    values["models"] = json.loads(values["models"])
    settings = Settings(**values)
    assert settings.device == "cuda" and {m.task for m in settings.models} >= {"classify", "fill-mask"}


def test_hpa_scales_on_a_metric_the_server_exports() -> None:
    hpa = next(d for d in rendered("gpu") if d["kind"] == "HorizontalPodAutoscaler")
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name in exported
    rules = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    assert name in rules["rules"]["custom"][0]["seriesQuery"]


def test_prometheus_and_grafana_files_parse_and_use_real_metrics() -> None:
    prometheus = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana" / "dashboards" / "perceiver.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"perceiver_[a-z_]+", e)}
    exported = {m.name for m in Metrics().registry.collect()}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("p99", "throughput", "batch size", "queue depth", "429", "504", "gpu memory"):
        assert topic in titles
    for path in (DEPLOY / "monitoring" / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1
    job = yaml.safe_load((DEPLOY / "jobs" / "fetch-models.yaml").read_text())
    assert job["kind"] == "Job"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "*.safetensors"):
        assert entry in ignored


# The release workflow (.github/workflows/release.yml), which builds and pushes the images deploy/ names.


def test_actionlint_finds_nothing_in_the_workflows(tmp_path: Path) -> None:
    """actionlint checks syntax, expressions and (with shellcheck) `run:` scripts. It checks an action's inputs only
    for a release it knows, not for a commit: so it lints each workflow twice, as written (actions pinned by commit)
    and with each pin replaced by the release named in its comment."""
    workflows = sorted(WORKFLOWS.glob("*.y*ml"))
    assert workflows
    by_release = []
    for workflow in workflows:
        copy = tmp_path / workflow.name
        copy.write_text(re.sub(r"@[0-9a-f]{40} # (v\d+)\S*", r"@\1", workflow.read_text()))
        by_release.append(copy)
    lint = [tool("actionlint"), "-shellcheck", tool("shellcheck"), "-pyflakes=", "-oneline"]
    result = run(*lint, *map(str, workflows), *map(str, by_release))
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_reports_what_it_should(tmp_path: Path) -> None:
    """The linter is live: a bad runner label, a misspelt action input and an unquoted variable are all reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  build:\n    runs-on: linux-latest\n    steps:\n"
        "      - uses: actions/checkout@v7\n        with:\n          fetch_depth: 0\n      - run: cd $DIR\n"
    )
    result = run(tool("actionlint"), "-shellcheck", tool("shellcheck"), "-pyflakes=", "-oneline", str(bad))
    assert result.returncode == 1
    for rule in ("[runner-label]", "[action]", "[shellcheck]"):
        assert rule in result.stdout, result.stdout


def _release_job() -> tuple[dict[str, Any], dict[str, Any]]:
    workflow = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    return workflow, workflow["jobs"]["image"]


def test_the_release_pushes_exactly_the_images_deploy_names() -> None:
    workflow, job = _release_job()
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["push"] is True
    assert build["with"]["tags"] == "${{ env.IMAGE }}:${{ steps.version.outputs.version }}-${{ matrix.variant }}"
    assert build["with"]["build-args"] == "VARIANT=${{ matrix.variant }}"
    variants = job["strategy"]["matrix"]["variant"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert all(f" AS base-{v}\n" in dockerfile for v in variants), "each variant needs its base stage"
    pushed = {f"{workflow['env']['IMAGE']}:{VERSION}-{v}" for v in variants}

    named = {c["image"] for o in OVERLAYS for c in _deployment(rendered(o))["spec"]["template"]["spec"]["containers"]}
    job_spec = yaml.safe_load((DEPLOY / "jobs" / "fetch-models.yaml").read_text())["spec"]["template"]["spec"]
    named |= {c["image"] for c in job_spec["containers"]}
    assert named == pushed


def test_the_release_pushes_to_ghcr_with_the_workflow_token() -> None:
    workflow, job = _release_job()
    assert workflow[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads the key `on` as true
    assert workflow["permissions"] == {"contents": "read"}
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    login = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/login-action@"))
    assert login["with"] == {
        "registry": "ghcr.io",
        "username": "${{ github.actor }}",
        "password": "${{ secrets.GITHUB_TOKEN }}",
    }


@pytest.mark.parametrize(
    ("tag", "variant", "ok"), [(f"v{VERSION}", "cpu", True), (f"v{VERSION}", "cuda", True), ("v9.9.9", "cpu", False)]
)
def test_the_release_refuses_a_tag_that_does_not_match_the_project(
    tag: str, variant: str, ok: bool, tmp_path: Path
) -> None:
    """The workflow's version step, run here as the runner would run it."""
    _, job = _release_job()
    step = next(s for s in job["steps"] if s.get("id") == "version")
    output = tmp_path / "github_output"
    env = {"PATH": "/usr/bin:/bin", "REF_NAME": tag, "VARIANT": variant, "GITHUB_OUTPUT": str(output)}
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    if ok:
        assert output.read_text() == f"version={tag.removeprefix('v')}\n"
