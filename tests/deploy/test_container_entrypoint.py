"""Start the server exactly as the image would, and see it become ready and answer.

Same entrypoint and environment as the Dockerfile, a non-root uid without capabilities (a user
namespace when the test runs as root), a read-only working directory, one writable temp directory, and
HF_HOME pointing at a mounted-style, read-only Hugging Face cache that holds a checkpoint made here.
API keys are on, as a deployment would have them, and the probes deploy/ uses must still answer: HTTP
/healthz and /readyz, and grpc.health.v1 on the gRPC port, asked as the kubelet asks, with no metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reference import save_small_image_classifier

from tests.app.conftest import MEDIA, free_port

from .test_deploy import ROOT, dockerfile

API_KEY = "deploy-test-key"


def grpc_health(port: int, timeout: float = 2) -> int | None:
    """grpc.health.v1 Check for the whole server (service ""), no metadata: the kubelet's gRPC probe. None when
    nothing answers within ``timeout``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise
    return int(reply.status)


def make_hf_cache(root: Path, repo: str) -> None:
    snapshot = root / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "4f1c3e2"
    save_small_image_classifier(snapshot, ["tabby", "tiger cat", "espresso", "cup"])
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("4f1c3e2")


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


def test_container_entrypoint_serves_a_mounted_checkpoint(tmp_path: Path) -> None:
    entrypoint, image_env, user = dockerfile()
    assert entrypoint == ["perceiver-serve"] and user.startswith("10001")
    assert image_env["HF_HOME"] == "/models/hf" and image_env["HF_HUB_OFFLINE"] == "1"

    models = tmp_path / "models"  # stands in for the /models volume
    make_hf_cache(models / "hf", "deepmind/vision-perceiver-fourier")
    workdir, scratch = tmp_path / "workdir", tmp_path / "tmp"
    workdir.mkdir()
    scratch.mkdir(mode=0o700)
    read_only(models)
    read_only(workdir)

    port, grpc_port = free_port(), free_port()
    env = {
        **image_env,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",  # our venv plays /opt/venv
        "HF_HOME": str(models / "hf"),
        "TMPDIR": str(scratch),
        "HOME": str(scratch),
        "PERCEIVER_HOST": "127.0.0.1",
        "PERCEIVER_PORT": str(port),
        "PERCEIVER_GRPC_PORT": str(grpc_port),  # the image's 8001, moved so tests can run side by side
        "PERCEIVER_API_KEYS": API_KEY,
        "PERCEIVER_MODELS": json.dumps(
            [{"task": "classify", "variant": "fourier", "source": "deepmind/vision-perceiver-fourier"}]
        ),
        "PERCEIVER_MAX_BATCH_SIZE": "2",
        "PYTHONPATH": str(ROOT),
    }
    command = [shutil.which("perceiver-serve", path=env["PATH"]) or "perceiver-serve"]
    if os.geteuid() == 0:  # drop to uid/gid 10001 with no capabilities, as the container's USER does
        command = ["unshare", "--user", "--map-user=10001", "--map-group=10001", *command]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            # Asked first: readiness never goes back while starting, so SERVING here means /readyz is 200 next.
            serving = grpc_health(grpc_port) == health_pb2.HealthCheckResponse.SERVING
            answer = None  # no answer in time (a busy machine) says nothing about the order
            with contextlib.suppress(httpx.TransportError):
                answer = httpx.get(url + "/readyz", timeout=10).status_code
            ready = answer == 200
            assert answer is None or ready or not serving, "gRPC health said SERVING before /readyz did"
            if ready:
                break
            time.sleep(0.2)
        assert ready, log.read_text()[-3000:]
        assert grpc_health(grpc_port, 30) == health_pb2.HealthCheckResponse.SERVING, log.read_text()[-3000:]
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        if os.geteuid() == 0:
            assert Path(f"/proc/{proc.pid}/uid_map").read_text().split()[:2] == ["10001", "0"]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"CapEff:\s+0+\n", status), "the server must run without capabilities"
        image = {"image": ("cat.jpg", (MEDIA / "cat.jpg").read_bytes())}
        assert httpx.post(url + "/v1/classify", files=image, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/classify", files=image, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["weights"] == "pretrained"
        assert {p["label"] for p in r.json()["predictions"]} <= {"tabby", "tiger cat", "espresso", "cup"}
        assert not any(workdir.iterdir()), "nothing may be written to the working directory"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
