"""The ``perceiver-serve`` command: uvicorn with draining, and a supervisor for several worker processes.

SIGTERM turns readiness off, refuses new task requests with 503, lets accepted ones finish, and exits 0
once the queues are empty; after ``drain_timeout_s`` it cuts what is left and exits 1. A second signal stops
at once, with exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI

from perceiver_core import attention

from . import DROPPED_METRICS_DIR, jsonlog, tracing
from .access import key_digests
from .main import create_app
from .runtime import Runtime
from .settings import Settings, load_settings

log = logging.getLogger("perceiver.server")


def _server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but SIGTERM drains first (readiness off, accepted work finishes) and exits 0 if nothing was cut."""

        def __init__(self, config: uvicorn.Config, runtime: Runtime, beat: Callable[[], None] | None = None) -> None:
            super().__init__(config)
            self.runtime = runtime
            self.exit_code = 0
            self.beat = beat  # under a supervisor: its watch on this process's event loop (``Heartbeats``)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:  # unlike uvicorn, do not re-raise the signal: a drained exit is a clean exit
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            started = self.runtime.drain_started
            if started is not None and time.monotonic() - started < SAME_SIGNAL_S:
                # the same stop delivered twice: Ctrl-C reaches every process, then the supervisor forwards it
                log.info("signal %d again within %.0f s: the same stop, still draining", sig, SAME_SIGNAL_S)
                return
            if self.runtime.draining:  # a second signal: stop now, and say so (exit 1: not a clean drain)
                if not self.force_exit:
                    log.warning("second signal: stopping now with %d requests in flight", self.runtime.inflight)
                self.runtime.forced = True
                self.should_exit = True
                self.force_exit = True
                self.exit_code = 1
            else:
                self.runtime.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            runtime = self.runtime
            if self.beat is not None:
                self.beat()
            if runtime.load_error is not None:
                self.exit_code = 1
                return True
            if runtime.draining and runtime.drain_started is not None:
                waited = time.monotonic() - runtime.drain_started
                left = runtime.settings.drain_timeout_s - waited
                if runtime.idle():
                    log.info("drained in %.2fs; exiting", waited)
                elif left <= 0 and runtime.inflight:  # exit 1: requests were cut, not a clean drain
                    log.warning(
                        "drain timeout (%.0fs) with %d requests in flight: they get 503 draining; exit 1",
                        waited,
                        runtime.inflight,
                    )
                    self.exit_code = 1
                elif left <= 0:  # only work whose requests had ended (a pass that skips them ends on its own)
                    log.info("drain timeout (%.0fs) with no request in flight; exiting", waited)
                else:
                    return bool(await super().on_tick(counter))
                # uvicorn's shutdown then waits for the connections still answering, and cancels what is left:
                # with what is left of the drain's time, not a whole drain timeout more (the requests it cancels
                # get a JSON 503 from app.middleware)
                self.config.timeout_graceful_shutdown = max(math.ceil(left), LAST_ANSWERS_S)
                return True
            return bool(await super().on_tick(counter))

    return DrainingServer


SAME_SIGNAL_S = 1.0  # a signal this soon after the one that began the drain is that one again, not a second
LAST_ANSWERS_S = 1  # seconds past the drain's time: for the answers being written, and the cut requests' 503s


def uvicorn_config(app: FastAPI, settings: Settings) -> Any:
    """uvicorn's settings for ``app``: httptools with our bounds on headers and the URL (app/httpserver.py)."""
    import uvicorn

    from .httpserver import BoundedHttpToolsProtocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=BoundedHttpToolsProtocol,
        ws="none",  # no WebSocket route: an Upgrade request is an ordinary one (it was a bare 403, logged nowhere)
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )


def _serve(
    settings: Settings,
    sockets: list[socket.socket] | None = None,
    model_socket: str | None = None,
    beat: Callable[[], None] | None = None,
) -> int:
    jsonlog.configure(settings.log_level)
    app = create_app(settings, model_socket=model_socket)
    if sockets is None:  # one process: our sockets, as the supervisor's, so that "::" answers IPv4 too
        try:
            sockets = _listen(settings)
        except OSError as exc:
            return _cannot_listen(settings, exc)
        if not _grpc_port_free(settings):
            for sock in sockets:
                sock.close()
            return 3
        log.info("listening on %s:%d", settings.host, settings.port)
    server = _server_class()(uvicorn_config(app, settings), app.state.runtime, beat)
    server.run(sockets=sockets)
    return int(server.exit_code)


def die_with_parent(parent: int) -> None:
    """In a child of the supervisor (pid ``parent``): SIGTERM when the supervisor dies, however it dies (the OOM
    killer's SIGKILL included), so that no process is left serving the port or holding the device without it
    (Linux). The supervisor may itself be pid 1 (the container's entrypoint), so it is named, not guessed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)


class Beat:
    """A server process's heartbeat (``Heartbeats``): sent to it as it starts, so a plain object, not a closure."""

    def __init__(self, times: Any, index: int) -> None:
        self.times, self.index = times, index

    def __call__(self) -> None:
        self.times[self.index] = time.monotonic()  # one aligned double: the supervisor reads it whole


class Heartbeats:
    """When each server process's event loop last ran (monotonic seconds, shared memory the supervisor made):
    a process writes its own as uvicorn ticks (10 times a second), and the supervisor takes the group down when
    one has not moved for ``STALL_S`` (``stalled``), so that the orchestrator restarts it. Liveness could not
    tell: the other processes answer the probes (audit: with one front end stopped, /healthz answered 200 20 times
    of 20, and 9-12 of 20 gRPC health checks, which the kernel gave the stopped one, timed out)."""

    STALL_S = 10.0  # as the front ends' watch on the model process (remote.MODEL_STALL_S)

    LOOK_GAP_S = 1.0  # the supervisor looks every 0.2 s: a longer gap means it was stopped too

    def __init__(self, context: Any, count: int) -> None:
        self.times = context.RawArray("d", count)  # 0: no beat yet (loading the models, or starting)
        self._seen = [0.0] * count  # each process's beat as last seen, and since when (the supervisor's clock)
        self._since = [0.0] * count
        self._looked: float | None = None

    def beat(self, index: int) -> Beat:
        return Beat(self.times, index)

    def served(self, index: int) -> bool:
        """Whether the process has run its event loop, serving, at least once."""
        return bool(self.times[index])

    def stalled(self, now: float) -> list[tuple[int, float]]:
        """The processes whose beat has not moved for ``STALL_S`` of the supervisor's own watching, with how long.
        Not the beat's age: a group stopped and resumed together (Ctrl-Z then fg, docker pause) has old beats, and
        the supervisor may look before they beat again (review: a healthy process killed in 6 runs of 8). A look
        more than ``LOOK_GAP_S`` after the last means the supervisor was stopped too: the watch starts over."""
        if self._looked is None or now - self._looked > self.LOOK_GAP_S:
            self._since = [now] * len(self._since)
        self._looked = now
        found = []
        for index, beat in enumerate(self.times):
            if beat != self._seen[index]:
                self._seen[index], self._since[index] = beat, now
            elif beat and now - self._since[index] > self.STALL_S:
                found.append((index, now - self._since[index]))
        return found


def _worker(settings_json: str, sockets: list[socket.socket], parent: int, beat: Callable[[], None]) -> None:
    die_with_parent(parent)
    sys.exit(_serve(Settings.model_validate_json(settings_json), sockets, beat=beat))


def _front_end(
    settings_json: str, sockets: list[socket.socket], model_socket: str, parent: int, beat: Callable[[], None]
) -> None:
    import torch

    die_with_parent(parent)
    torch.set_num_threads(1)  # a front end decodes in its own threads; the cores' torch threads are the model's
    sys.exit(_serve(Settings.model_validate_json(settings_json), sockets, model_socket, beat))


def _model_process(settings_json: str, path: str, parent: int) -> None:
    import asyncio

    from . import model_process

    die_with_parent(parent)
    settings = Settings.model_validate_json(settings_json)
    jsonlog.configure(settings.log_level)
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(model_process.serve(settings, path)))


def _listen(settings: Settings) -> list[socket.socket]:
    """The listening sockets: one per address the host names, as asyncio binds them (``localhost``: 127.0.0.1
    and ::1). Host ``::`` is every address of both stacks, as ``0.0.0.0`` is of IPv4: asyncio's own IPv6 sockets
    answer IPv6 only, so a probe or HEALTHCHECK on 127.0.0.1 or the pod's IPv4 got no answer."""
    host = settings.host.strip("[]")  # "" is every interface, of both stacks, as asyncio reads it
    found = socket.getaddrinfo(host or None, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address[:2]) for family, _, _, _, address in found))
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" alone: both stacks; beside the name's IPv4 address: IPv6 only
                both = _unspecified(host) and len(addresses) == 1
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if both else 1)
            sock.bind(address)
            sock.listen(2048)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # not an address: bind says what is wrong with it
        return False


def _grpc_port_free(settings: Settings) -> bool:
    """Whether the gRPC port is free, checked by binding it (without SO_REUSEPORT) before anything loads; if not,
    one line. Several processes share it with SO_REUSEPORT, which any other program may have set as well (gRPC's
    servers do by default): with front ends, a second server on the same port started, and took part of its
    calls."""
    if not settings.grpc_port:
        return True
    try:
        for probe in _listen(settings.model_copy(update={"port": settings.grpc_port})):
            probe.close()
    except OSError as exc:
        log.error("gRPC cannot listen on %s:%d: %s", settings.host, settings.grpc_port, exc.strerror or exc)
        return False
    return True


def _cannot_listen(settings: Settings, exc: OSError) -> int:
    """One line and exit 3, however many processes would have served (uvicorn's traceback and exit 1 before)."""
    log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
    return 3


def _supervise(settings: Settings) -> int:
    """Run the server processes on one listening socket; SIGTERM drains them all.

    ``workers`` > 1: that many copies of the whole server. ``api_processes`` >= 1: that many front ends and one
    model process (docs/front-ends.md); SIGTERM goes to every process at once, and the model process answers
    the front ends until they have drained and gone, so that what they accepted is answered, all of it within
    one drain_timeout_s."""
    import multiprocessing
    import tempfile

    from prometheus_client import multiprocess

    from .model_process import load_error

    try:
        sockets = _listen(settings)
    except OSError as exc:
        return _cannot_listen(settings, exc)
    if not _grpc_port_free(settings):
        for sock in sockets:
            sock.close()
        return 3
    for sock in sockets:
        sock.set_inheritable(True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="perceiver-metrics-")
    os.environ["PERCEIVER_METRICS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]  # ours: the processes keep it
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    fronts = settings.front_end_processes()
    if fronts:
        settings = settings.model_copy(update={"api_processes": fronts})
    payload = settings.model_dump_json()
    me = os.getpid()
    last: list[Any] = []  # stopped after every other process has exited
    path = ""  # the model process's socket, with front ends
    beats = Heartbeats(context, fronts or settings.workers)
    if fronts:
        path = os.path.join(tempfile.mkdtemp(prefix="perceiver-model-"), "model.sock")
        last = [context.Process(target=_model_process, args=(payload, path, me), name="model")]
        procs = [
            context.Process(target=_front_end, args=(payload, sockets, path, me, beats.beat(i)), name=f"front-end-{i}")
            for i in range(fronts)
        ]
    else:
        procs = [
            context.Process(target=_worker, args=(payload, sockets, me, beats.beat(i)), name=f"worker-{i}")
            for i in range(settings.workers)
        ]
    stopping = False

    def signal_all(sig: int, group: list[Any]) -> None:
        for proc in group:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, sig)

    def forward(sig: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        # Every process at once, the model process too: it serves the front ends until they have drained and
        # gone, within the same drain_timeout_s (signalled after them, it took a second drain's time). SIGTERM
        # whichever came: a process still starting dies of it quietly (SIGINT printed a KeyboardInterrupt
        # traceback from each: review); a started one drains on either.
        signal_all(signal.SIGTERM, [*procs, *last])

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for proc in [*last, *procs]:
        proc.start()
        if stopping:  # the signal came as the processes started: this one may not have had it (audit: it came up,
            os.kill(proc.pid, signal.SIGTERM)  # answered ready and never stopped); twice is once (SAME_SIGNAL_S)

    def quiet_stop(proc: Any) -> bool:
        """Stopped by the signal before it had served (its handlers not in place yet): a clean stop. A process
        that had served and dies of a signal was cut (review: a worker whose drain timed out, dying of a second
        SIGTERM in its teardown, made the group exit 0)."""
        if not stopping or proc.exitcode not in (-signal.SIGTERM, -signal.SIGINT):
            return False
        if proc in procs:
            return not beats.served(procs.index(proc))
        return not any(beats.served(i) for i in range(len(procs)))  # the model process: before any front end served

    if fronts:
        log.info("started %d front ends and the model process on %s:%d", fronts, settings.host, settings.port)
    else:
        log.info("started %d workers on %s:%d", settings.workers, settings.host, settings.port)
    codes: dict[int, int] = {}
    everything = [*procs, *last]
    while len(codes) < len(everything):
        for proc in everything:
            if proc.pid in codes or proc.is_alive():
                continue
            if proc.pid is None or proc.exitcode is None:  # not started yet
                continue
            codes[proc.pid] = 0 if quiet_stop(proc) else proc.exitcode
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            if not stopping:  # a process died on its own: take the rest down, let the orchestrator restart us
                failed = load_error(path) if fronts else None
                if failed is not None:  # the front ends exit first, as the model process closes on them
                    log.error("the model process could not load the models (%s); stopping", failed)
                else:
                    log.error("%s exited with %s; stopping", proc.name, proc.exitcode)
                forward(signal.SIGTERM, None)
        for index, stalled_s in [] if stopping else beats.stalled(time.monotonic()):
            # its accepted requests cannot be answered, and it cannot drain: killed, the others drained
            hung = procs[index]
            log.error("%s has not run its event loop for %.0f s; stopping", hung.name, stalled_s)
            forward(signal.SIGTERM, None)
            if hung.pid is not None:
                os.kill(hung.pid, signal.SIGKILL)
        if stopping and all(proc.pid in codes for proc in procs):  # nothing serves the port any more: refuse, do
            for sock in sockets:  # not queue (the model process may still be stopping; connections hung in
                sock.close()  # the backlog until it had)
        time.sleep(0.2)
    for sock in sockets:
        sock.close()
    if fronts:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)  # one folder a start, left in /tmp
    return 0 if all(code == 0 for code in codes.values()) and stopping else 1


def describe_settings_error(exc: Exception, config: str | None) -> str:
    """Why the settings were refused, naming each setting as the environment spells it, without the values."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, ValidationError):
        problems: dict[str, list[str]] = {}
        for error in exc.errors():
            loc = [str(p) for p in error.get("loc", ())]
            message = str(error["msg"]).removeprefix("Value error, ")
            if not loc:
                problems.setdefault("", []).append(message)
                continue
            name = f"PERCEIVER_{loc[0].upper()}"
            inner = [p for p in loc[1:] if p.isidentifier() or p.isdigit()]  # not a union's branch ("int")
            where = name + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in inner if p not in ("int", "str"))
            problems.setdefault(where, []).append(message)
        return "; ".join(
            (f"{where}: " if where else "") + ", or ".join(dict.fromkeys(found)) for where, found in problems.items()
        )
    if isinstance(exc, SettingsError):
        return f"{exc} (settings that are lists or mappings, such as PERCEIVER_MODELS, take JSON)"
    if isinstance(exc, OSError):
        return f"{exc.filename or config}: {exc.strerror or exc}"
    if config is not None and type(exc).__name__ == "JSONDecodeError":
        return f"{config}: not valid JSON: {getattr(exc, 'msg', '')} at line {getattr(exc, 'lineno', '?')}"
    if config is not None and type(exc).__module__.startswith("yaml"):  # its message quotes the line: a key, maybe
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{config}: not valid YAML: {getattr(exc, 'problem', None) or type(exc).__name__}{where}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceiver-serve", description="Serve Perceiver IO models over HTTP.")
    parser.add_argument("--host", help="interface to bind (PERCEIVER_HOST)")
    parser.add_argument("--port", type=int, help="TCP port (PERCEIVER_PORT)")
    parser.add_argument("--workers", type=int, help="server processes (PERCEIVER_WORKERS)")
    parser.add_argument("--config", help="JSON or YAML file with settings and per-model overrides")
    args = parser.parse_args(argv)
    given = (("host", args.host), ("port", args.port), ("workers", args.workers))
    try:
        settings = load_settings(args.config, **{k: v for k, v in given if v is not None})
        key_digests(settings)  # the keys file read and keys set empty refused, before any process starts
        tracing.check(settings)  # an exporter no package provides, or one its variables break
        for switch in (attention.WIDE_ATTENTION, attention.LAYER_NORM):  # not inside the first forward pass
            switch.choice()
    except Exception as exc:  # one line that names the setting, never a traceback (nor a value: it may be a key)
        jsonlog.configure("INFO")
        log.error("invalid settings: %s", describe_settings_error(exc, args.config))
        sys.exit(2)
    jsonlog.configure(settings.log_level)
    if DROPPED_METRICS_DIR is not None:
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR=%s from the environment is ignored: this server keeps its own metrics (its "
            "supervisor shares them between its processes)",
            DROPPED_METRICS_DIR,
        )
    raise_open_files_limit()
    several = settings.workers > 1 or settings.front_end_processes() > 0
    sys.exit(_supervise(settings) if several else _serve(settings))


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor, and containers often start with a soft limit of 1,024: about 1,100
    idle or slow connections (no key needed) locked every client out. The soft limit is raised to the hard one
    (children inherit it), as nginx's worker_rlimit_nofile does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default nr_open, for "unlimited"
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays %d (could not raise it to %d: %s)", soft, target, exc)
        return
    log.info("open files limit raised from %d to %d (one per connection)", soft, target)


if __name__ == "__main__":
    main()
