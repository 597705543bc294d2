"""Triton's load generator, perf_analyzer, unmodified, against this server: gRPC, HTTP binary and HTTP JSON.

    # start a demo server (classify + classify-text, gRPC on a free port), fetch the tools, measure, record
    # (the docs/performance.md run):
    python benchmarks/perf_analyzer.py --repeat 3 --json benchmarks/results/cpu-perf-analyzer/$(date +%F).json
    # a server that is already running (REST/v2 on 8000, gRPC on 8001):
    python benchmarks/perf_analyzer.py --url http://127.0.0.1:8000 --grpc-url 127.0.0.1:8001 --concurrency 1,4
    # only fetch perf_analyzer and its two libraries, and print how to run it by hand:
    python benchmarks/perf_analyzer.py --fetch-only

perf_analyzer is the C++ binary that tritonclient's manylinux wheel ships (2.41.0's
``tritonclient-2.41.0.data/data/bin/perf_analyzer``). It links libb64.so.0d (Debian's ``libb64-0d``) and
libcudart.so.12 (NVIDIA's ``nvidia-cuda-runtime-cu12`` wheel, CUDA 12.3 as in Triton 23.12, the release
2.41.0 belongs to). All three are downloaded and unpacked into a cache directory outside the repository
(``$XDG_CACHE_HOME/perceiver-serve/perf_analyzer/2.41.0``) and the binary runs from there with
LD_LIBRARY_PATH pointing at them: nothing is installed system-wide and the binary is not modified.

Inputs are real: English sentences for classify-text (TEXT, BYTES) and the two sample photos for
classify.learned (IMAGE, BYTES, the JPEG files as they are), in perf_analyzer's ``--input-data`` JSON
with the shape [1] of the model configuration's ``dims``. A BYTES tensor given as ``{"b64": ...}`` is
used as raw tensor data, so each photo goes as its 4-byte little-endian length and then its bytes. One
tritonclient call per model and protocol checks the server answers those inputs with a 200 first.

Every model x concurrency x protocol is one perf_analyzer run (protocols interleaved, and with --repeat the
whole set again, so drift touches them alike) in time windows until three in a row agree within
--stability percent; its CSV gives throughput, p50/p99 latency and, from Triton's statistics extension,
the server's queue and compute times. The table shows medians over the repeats. A run that fails keeps
its command and perf_analyzer's message in the results. The spawned server's queue-delay target is 5 s:
perf_analyzer stops at the first refused request. Not part of CI.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import platform
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import free_port, spawn  # noqa: E402

TRITONCLIENT = "2.41.0"
CUDART = "12.3.101"  # CUDA 12.3, as in Triton 23.12 (2.41.0); the binary asks only for the soname libcudart.so.12
LIBB64_DEB = "libb64-0d"
LIBB64_POOL = "https://deb.debian.org/debian/pool/main/libb/libb64/"  # where apt-get download finds it
WHEEL_BINARY = f"tritonclient-{TRITONCLIENT}.data/data/bin/perf_analyzer"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "perceiver-serve" / "perf_analyzer"
MEDIA = ROOT / "tests" / "media"

SENTENCES = [
    "The service was quick and the food arrived hot, so we will certainly come back next week.",
    "I waited forty minutes on the phone and nobody could tell me where my parcel had gone.",
    "The new update drains the battery in a few hours and the screen flickers when it charges.",
    "What a lovely surprise: the hotel upgraded our room and left a bottle of wine on the table.",
    "The lecture was clear, well paced, and the examples made a difficult topic easy to follow.",
    "Shipping took three weeks and the box arrived crushed, with half of the glasses broken.",
    "Perceiver IO reads raw UTF-8 bytes, so no tokenizer vocabulary limits what it can classify.",
    "It rained all weekend, but the museum was quiet and the coffee in its cafe was excellent.",
]
PHOTOS = ["cat.jpg", "coffee.jpg"]
MODELS = {"classify-text": ("classify-text", "TEXT"), "classify.learned": ("classify", "IMAGE")}
PROTOCOLS = {
    "grpc": ["-i", "grpc"],
    "http-binary": ["-i", "http"],  # binary tensors are perf_analyzer's default over HTTP
    "http-json": ["-i", "http", "--input-tensor-format=json", "--output-tensor-format=json"],
}


@dataclass(frozen=True)
class Tools:
    binary: Path
    libs: Path
    sha256: str

    def env(self) -> dict[str, str]:
        old = os.environ.get("LD_LIBRARY_PATH", "")
        return {**os.environ, "LD_LIBRARY_PATH": f"{self.libs}:{old}" if old else str(self.libs)}


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _pip_download(requirement: str, into: Path) -> Path:
    """The one manylinux x86_64 wheel of ``requirement``, downloaded (no dependencies) into ``into``."""
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(into.glob(f"{name}-*.whl"))
    if not found:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
             "manylinux1_x86_64", "--dest", str(into), requirement],
            into,
        )  # fmt: skip
        found = sorted(into.glob(f"{name}-*.whl"))
    if len(found) != 1:
        raise RuntimeError(f"expected one {name} wheel in {into}, found {[p.name for p in found]}")
    return found[0]


def _extract(wheel: Path, member: str, to: Path) -> None:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
        to.write_bytes(src.read())


def fetch_tools(cache: Path, libb64_deb: Path | None = None) -> Tools:
    """perf_analyzer and the two libraries it links that this machine lacks, unpacked under ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    binary, libs = cache / "bin" / "perf_analyzer", cache / "lib"
    libs.mkdir(exist_ok=True)
    binary.parent.mkdir(exist_ok=True)
    if not binary.exists():
        _extract(_pip_download(f"tritonclient=={TRITONCLIENT}", cache), WHEEL_BINARY, binary)
        binary.chmod(0o755)
    if not (libs / "libcudart.so.12").exists():
        wheel = _pip_download(f"nvidia-cuda-runtime-cu12=={CUDART}", cache)
        _extract(wheel, "nvidia/cuda_runtime/lib/libcudart.so.12", libs / "libcudart.so.12")
    if not (libs / "libb64.so.0d").exists():
        debs = [libb64_deb] if libb64_deb else sorted(cache.glob(f"{LIBB64_DEB}_*.deb"))
        if not debs:
            try:
                _run(["apt-get", "download", LIBB64_DEB], cache)  # a download only: dpkg never installs it
            except (OSError, subprocess.CalledProcessError) as exc:
                raise RuntimeError(
                    f"apt-get download {LIBB64_DEB} failed ({exc}): download the amd64 .deb from {LIBB64_POOL} "
                    "and pass it with --libb64-deb"
                ) from None
            debs = sorted(cache.glob(f"{LIBB64_DEB}_*.deb"))
        unpacked = cache / "libb64-deb"
        _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], cache)
        (libs / "libb64.so.0d").write_bytes(next(unpacked.rglob("libb64.so.0d")).read_bytes())
    return Tools(binary, libs, hashlib.sha256(binary.read_bytes()).hexdigest())


def _bytes_element(data: bytes) -> dict[str, str]:
    """One BYTES element as perf_analyzer's raw tensor data: its 4-byte little-endian length, then it."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def input_data(model: str) -> dict[str, list[dict[str, dict[str, object]]]]:
    """perf_analyzer's --input-data JSON for ``model``: one step per sentence or photo, shape [1] (the dims)."""
    _, name = MODELS[model]
    if name == "TEXT":
        steps = [{name: {"content": [s], "shape": [1]}} for s in SENTENCES]
    else:
        steps = [{name: {**_bytes_element((MEDIA / p).read_bytes()), "shape": [1]}} for p in PHOTOS]
    return {"data": steps}


def first_element(model: str) -> bytes:
    return SENTENCES[0].encode() if MODELS[model][1] == "TEXT" else (MEDIA / PHOTOS[0]).read_bytes()


def check_answers(models: list[str], http: str, grpc_url: str | None) -> dict[str, str]:
    """One tritonclient call per model and protocol with the first input as [1, 1] BYTES: 200 and the top
    label, or the error. ``http`` and ``grpc_url`` are host:port."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    found: dict[str, str] = {}
    for model in models:
        name = MODELS[model][1]
        element = np.array([[first_element(model)]], dtype=np.object_)
        for protocol, module, url in (("http", httpclient, http), ("grpc", grpcclient, grpc_url)):
            if url is None:
                continue
            client = module.InferenceServerClient(url)
            tensor = module.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(element)
            try:
                result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput("LABELS")])
                found[f"{model} {protocol}"] = f"200: {result.as_numpy('LABELS')[0][0].decode()}"
            except InferenceServerException as exc:
                found[f"{model} {protocol}"] = f"failed: {exc}"
            finally:
                client.close()
    return found


@dataclass
class Run:
    model: str
    protocol: str
    concurrency: int
    command: str
    infer_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    client_send_ms: float = 0.0
    network_server_ms: float = 0.0  # perf_analyzer's "Network+Server Send/Recv"
    server_queue_ms: float = 0.0
    server_compute_input_ms: float = 0.0
    server_compute_infer_ms: float = 0.0
    server_compute_output_ms: float = 0.0
    client_recv_ms: float = 0.0
    seconds: float = 0.0
    attempts: int = 1
    error: str = ""

    @property
    def server_compute_ms(self) -> float:
        return self.server_compute_input_ms + self.server_compute_infer_ms + self.server_compute_output_ms

    @property
    def client_network_ms(self) -> float:
        """The mean latency less the server's queue and compute: what the client and the protocol cost."""
        return self.client_send_ms + self.network_server_ms + self.client_recv_ms


CSV_FIELDS = {  # perf_analyzer -f column (microseconds, throughput per second) -> Run field
    "Inferences/Second": "infer_per_s",
    "p50 latency": "p50_ms",
    "p90 latency": "p90_ms",
    "p99 latency": "p99_ms",
    "Client Send": "client_send_ms",
    "Network+Server Send/Recv": "network_server_ms",
    "Server Queue": "server_queue_ms",
    "Server Compute Input": "server_compute_input_ms",
    "Server Compute Infer": "server_compute_infer_ms",
    "Server Compute Output": "server_compute_output_ms",
    "Client Recv": "client_recv_ms",
}


UNSTABLE = "Failed to obtain stable measurement"


def _why(output: str) -> str:
    """The line of perf_analyzer's output that says why it stopped (the last error line), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("Checking tensor")]
    errors = [line for line in lines if "error" in line.lower() or line.startswith("Failed")]
    return (errors or lines or ["no output"])[-1]


def measure(tools: Tools, run: Run, argv: list[str], timeout: float) -> Run:
    csv_path = tools.libs.parent / "last.csv"
    csv_path.unlink(missing_ok=True)
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [str(tools.binary), *argv, "-f", str(csv_path)],
            env=tools.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        said = b"".join(x if isinstance(x, bytes) else (x or "").encode() for x in (exc.stdout, exc.stderr))
        output, rc = f"{said.decode(errors='replace')}\ntimed out after {timeout:.0f} s", -1
    run.seconds = time.monotonic() - t0
    if rc != 0 or not csv_path.exists():
        run.error = f"exit {rc}: {_why(output)}"
        return run
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    if not rows:
        run.error = f"exit {rc}, empty CSV: {_why(output)}"
        return run
    row = rows[-1]
    for column, field in CSV_FIELDS.items():
        value = float(row.get(column) or 0.0)
        setattr(run, field, value if field == "infer_per_s" else value / 1000.0)
    return run


def perf_args(model: str, protocol: str, concurrency: int, url: str, data: Path, args: argparse.Namespace) -> list[str]:
    return [
        "-m", model, *PROTOCOLS[protocol], "-u", url, "--input-data", str(data),
        "--concurrency-range", str(concurrency), "--measurement-mode", "time_windows",
        "--measurement-interval", str(args.window_ms), "--stability-percentage", str(args.stability),
        "--max-trials", str(args.max_trials),
    ]  # fmt: skip


def sweep(tools: Tools, http: str, grpc_url: str | None, args: argparse.Namespace) -> list[Run]:
    """Every model x concurrency x protocol, the whole set ``args.repeat`` times over, so drift touches all alike."""
    data_dir = tools.libs.parent / "inputs"
    data_dir.mkdir(exist_ok=True)
    runs = []
    for _ in range(args.repeat):
        for model in args.models:
            data = data_dir / f"{model}.json"
            data.write_text(json.dumps(input_data(model)))
            for concurrency in args.concurrency:
                for protocol in args.protocols:
                    url = grpc_url if protocol == "grpc" else http
                    if url is None:
                        continue
                    argv = perf_args(model, protocol, concurrency, url, data, args)
                    shown = shlex.join(["perf_analyzer", *argv]).replace(str(data_dir) + "/", "")
                    run = measure(tools, Run(model, protocol, concurrency, shown), argv, args.timeout)
                    if UNSTABLE in run.error:  # a noisy neighbour on a shared machine: one more try, then it stands
                        run = measure(tools, Run(model, protocol, concurrency, shown, attempts=2), argv, args.timeout)
                    print(json.dumps(asdict(run)), flush=True)
                    runs.append(run)
    return runs


SHOWN = ("infer_per_s", "p50_ms", "p99_ms", "server_queue_ms", "server_compute_ms", "client_network_ms")  # columns


def table(runs: list[Run]) -> str:
    """Medians over the repeats that succeeded; a model x protocol x concurrency none of them did shows why."""
    rows = [
        "| model | protocol | concurrency | runs ok | infer/s | p50 ms | p99 ms | server queue ms | server compute ms "
        "| client + network ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.protocol, r.concurrency), []).append(r)
    for (model, protocol, concurrency), group in groups.items():
        ok = [r for r in group if not r.error]
        head = f"| {model} | {protocol} | {concurrency} | {len(ok)}/{len(group)} "
        if not ok:
            message = group[-1].error.replace("|", "\\|")
            rows.append(f"{head}| failed: {message} | | | | | |")
            continue
        medians = {name: statistics.median(getattr(r, name) for r in ok) for name in SHOWN}
        rows.append(
            head + "".join(f"| {v:.{2 if n == 'client_network_ms' else 1}f} " for n, v in medians.items()) + "|"
        )
    return "\n".join(rows)


def machine(root: Path) -> dict[str, object]:
    """Where this ran: the date, the commit of the server's tree (and what it had not committed), the CPUs."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip() or "not a git checkout",
        "uncommitted": [line[3:] for line in changed.stdout.splitlines()],
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server's HTTP address (default: spawn a demo server on loopback)")
    parser.add_argument("--grpc-url", help="its gRPC host:port (with --url; without it gRPC is left out)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help=",".join(MODELS))
    parser.add_argument("--protocols", type=lambda s: s.split(","), default=list(PROTOCOLS), help=",".join(PROTOCOLS))
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's --measurement-interval")
    parser.add_argument("--stability", type=int, default=15, help="perf_analyzer's --stability-percentage")
    parser.add_argument("--max-trials", type=int, default=8, help="perf_analyzer's --max-trials (windows per run)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole set this many times; tables show medians")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds before a perf_analyzer run is stopped")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the spawned server (repeatable)")
    parser.add_argument("--root", type=Path, default=ROOT, help="spawn the server of the tree at this path")
    parser.add_argument("--cache", type=Path, default=CACHE / TRITONCLIENT, help="where the tools are unpacked")
    parser.add_argument("--libb64-deb", type=Path, help="a downloaded libb64-0d .deb, where apt-get download fails")
    parser.add_argument("--fetch-only", action="store_true", help="fetch the tools, print how to run them, stop")
    parser.add_argument("--note", default="", help="what the results file should say about the server measured")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: {name!r} is not one of {', '.join(MODELS)}")
    for name in args.protocols:
        if name not in PROTOCOLS:
            parser.error(f"--protocols: {name!r} is not one of {', '.join(PROTOCOLS)}")
    tools = fetch_tools(args.cache.expanduser(), args.libb64_deb)
    if args.fetch_only:
        print(f"LD_LIBRARY_PATH={tools.libs} {tools.binary} --help   # sha256 {tools.sha256}")
        return
    proc, server_env = None, dict(pair.split("=", 1) for pair in args.env)
    if args.url:
        http, grpc_url = args.url, args.grpc_url
    else:
        grpc_port = free_port()
        tasks = sorted({MODELS[m][0] for m in args.models})
        env = {
            "PERCEIVER_DEMO_TASKS": json.dumps(tasks),
            "PERCEIVER_GRPC_PORT": str(grpc_port),
            # perf_analyzer stops at the first refused request; 8 closed-loop clients of a ~150 ms image model on
            # 2 cores queue past the default 500 ms target, which this benchmark is not about
            "PERCEIVER_MAX_QUEUE_DELAY_MS": "5000",
        }
        server_env = {**env, **server_env}
        proc, http = spawn(server_env, root=args.root.resolve())
        grpc_url = f"127.0.0.1:{grpc_port}"
    http = urlsplit(http).netloc or http  # host:port, as perf_analyzer and tritonclient take it
    try:
        answers = check_answers(args.models, http, grpc_url)
        print(json.dumps(answers, indent=1), flush=True)
        runs = sweep(tools, http, grpc_url, args)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    text = table(runs)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine(args.root.resolve()),
            "perf_analyzer": {"tritonclient": TRITONCLIENT, "cudart": CUDART, "sha256": tools.sha256},
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "cache", "libb64_deb")},
            "server": {"spawned": proc is not None, "env": server_env},
            "checks": answers,
            "runs": [
                asdict(r) | {"server_compute_ms": r.server_compute_ms, "client_network_ms": r.client_network_ms}
                for r in runs
            ],
        }
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
