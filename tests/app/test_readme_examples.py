"""Every curl in the README runs as written, from the repository root, against a live demo server, and gives
what the README shows; so does the Python client's example.

Each command runs in bash with `localhost:8000` pointed at the test server and `curl` wrapped to report
the status and content type on stderr. What the README shows after the command says what to expect:
response headers (`-D -`), a `-w` status line, an error body, or a JSON body. A JSON body is compared field
by field, values included, but for ids, timings and what warm-up decides from them (the test server does not
warm up); shown headers are compared by value, but for ids and timings. Where the README cuts output short
(`[...]`, `, ...]`, `[... 5,400 bytes ...]`, `| head -c 120`), what it shows must still be what the server sent.

A command runs in a folder that stands in for the repository root (the sample files are linked there), and
must leave nothing in it: a reader who pastes the README's curls keeps a clean `git status`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CURL = shutil.which("curl")
STATUS_BY_ERROR = {
    "invalid_input": 422,
    "not_found": 404,
    "unsupported_media_type": 415,
    "bad_request": 400,
    "payload_too_large": 413,
}
ELIDED = "<elided>"  # stands for the items the README leaves out of a list: `[...]`, `, ...]`
CUT_BYTES = re.compile(r"\[\.\.\. [\d,]+ bytes \.\.\.\]")  # the bytes it leaves out of a string
# Timings and what warm-up decides from them, which differ from one start, and one machine, to the next; and
# request ids. Their values are not compared, only that the README shows them and what kind they are.
NOT_COMPARED = {
    "id",
    "load_s",
    "warmup_s",
    "per_item_ms",
    "admission_per_item_ms",
    "admission_per_item_ms_by_bucket",
    "max_batch_size",
    "max_batch_size_source",
    "placement",
}
VARYING_HEADERS = {"x-request-id", "x-queue-time-ms", "x-inference-time-ms"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """The server `make serve` starts with nothing configured (the demo profile, default settings), without the
    warm-up: what it measures is left out of the comparison."""
    server = LiveServer().start()
    yield server
    server.stop()


def examples() -> list[tuple[str, list[str]]]:
    """(command, the lines the README shows after it) for each `$ curl` in a console block."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                found.append((line[2:], []))
            elif found and line.strip():
                found[-1][1].append(line)
    return found


EXAMPLES = examples()


def test_the_readme_has_an_example_for_every_endpoint() -> None:
    commands = " ".join(command for command, _ in EXAMPLES)
    for path in ("/v1/classify", "/v1/fill-mask", "/v1/classify-text", "/v1/optical-flow", "/v1/autoencode"):
        assert f"localhost:8000{path}" in commands, path
    assert all(command.startswith("curl ") for command, _ in EXAMPLES)
    for command, _ in EXAMPLES:
        if "|" in command:  # a progress meter would be printed over the piped output
            assert re.search(r"curl (.* )?-s", command), command


@dataclass
class Shown:
    """What the README prints after a command."""

    status: int
    content_type: str
    body: object = None  # the JSON body, with ELIDED where items are left out
    headers: dict[str, str] = field(default_factory=dict)
    prefix: str | None = None  # output cut short by `| head -c N`: the server's output starts with it


def shown_json(line: str) -> object:
    return json.loads(line.replace("[...]", f'["{ELIDED}"]').replace(", ...]", f', "{ELIDED}"]'))


def expectation(shown: list[str]) -> Shown:
    text = "\n".join(shown)
    if status := re.search(r"^HTTP/1\.1 (\d{3})", text, re.M):
        headers = dict(line.split(": ", 1) for line in shown[1:])
        assert "content-type" in headers, text
        return Shown(int(status.group(1)), headers["content-type"], headers=headers)
    if line := re.fullmatch(r"(\d{3}) (\S+)", shown[0]):
        return Shown(int(line.group(1)), line.group(2))
    if shown[0].startswith("{"):
        try:
            body = shown_json(shown[0])
        except json.JSONDecodeError:  # cut short in the README (| head -c 120)
            return Shown(200, "application/json", prefix=shown[0])
        if isinstance(body, dict) and "error" in body:
            return Shown(STATUS_BY_ERROR[body["error"]["type"]], "application/json", body)
        return Shown(200, "application/json", body)
    return Shown(200, "text/plain")  # /metrics


def kind(value: object) -> str:
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def differences(shown: object, sent: object, where: str = "") -> list[str]:
    """Where the README's JSON differs from the server's: keys, kinds and values, timings by kind alone."""
    if kind(shown) != kind(sent):
        return [f"{where or 'body'}: the README shows {shown!r}, the server sent {sent!r}"]
    if isinstance(shown, dict) and isinstance(sent, dict):
        if set(shown) != set(sent):
            return [f"{where or 'body'}: the README shows keys {sorted(shown)}, the server sent {sorted(sent)}"]
        found = []
        for key in shown:
            if key not in NOT_COMPARED:
                found += differences(shown[key], sent[key], f"{where}.{key}")
        return found
    if isinstance(shown, list) and isinstance(sent, list):
        cut = bool(shown) and shown[-1] == ELIDED
        items = shown[:-1] if cut else shown
        if len(sent) < len(items) or (not cut and len(sent) != len(items)):
            return [
                f"{where}: the README shows {len(items)} items{' and more' if cut else ''}, the server sent {len(sent)}"
            ]
        return [d for i, item in enumerate(items) for d in differences(item, sent[i], f"{where}[{i}]")]
    if isinstance(shown, str) and isinstance(sent, str) and CUT_BYTES.search(shown):
        head, tail = CUT_BYTES.split(shown, 1)
        return [] if sent.startswith(head) and sent.endswith(tail) else [f"{where}: {shown!r} is not {sent!r}, cut"]
    if kind(shown) == "number":
        # The README shows what the server rounds (scores to 6 places); a last digit may differ between machines.
        assert isinstance(shown, int | float) and isinstance(sent, int | float)
        return [] if math.isclose(shown, sent, rel_tol=1e-4, abs_tol=2e-6) else [f"{where}: {shown} is not {sent}"]
    return [] if shown == sent else [f"{where}: the README shows {shown!r}, the server sent {sent!r}"]


def test_the_comparison_holds_the_readme_to_what_the_server_sends() -> None:
    sent = {"model": "m", "load_s": 0.2, "scores": [0.5, 0.25, 0.25], "text": "ab" * 100}
    assert (
        differences(shown_json('{"model":"m","load_s":9,"scores":[0.5, ...],"text":"ab[... 196 bytes ...]ab"}'), sent)
        == []
    )
    assert differences(shown_json('{"model":"m","load_s":1,"scores":[...],"text":"' + "ab" * 100 + '"}'), sent) == []
    assert differences(shown_json('{"model":"m","scores":[0.5,0.25,0.25],"text":""}'), sent)  # load_s is missing
    assert differences(shown_json('{"model":"m","load_s":"1","scores":[...],"text":""}'), sent)  # a string
    assert differences(shown_json('{"model":"x","load_s":1,"scores":[...],"text":""}'), sent)  # another value
    assert differences(shown_json('{"model":"m","load_s":1,"scores":[0.5,0.25],"text":""}'), sent)  # not cut
    assert differences(shown_json('{"model":"m","load_s":1,"scores":[0.6, ...],"text":""}'), sent)  # a score


def test_the_timings_the_readme_shows_could_have_been_measured() -> None:
    """Timings are not compared with the server's, so the README's must at least agree with each other: a model's
    warm-up (warmup_s) ran at least one pass of every batch size whose per-item time it shows."""
    for command, shown in EXAMPLES:
        if command.startswith("curl localhost:8000/v1/models"):
            for model in shown_json(shown[0])["models"]:  # type: ignore[index]
                if model == ELIDED:
                    continue
                passes_s = sum(int(size) * ms for size, ms in model["batching"]["per_item_ms"].items()) / 1000
                assert model["warmup_s"] >= passes_s, (model["name"], model["warmup_s"], passes_s)
            return
    raise AssertionError("the README shows no /v1/models example")


def sent_headers(stdout: str) -> dict[str, str]:
    head = re.split(r"\r?\n\r?\n", stdout, maxsplit=1)[0].splitlines()[1:]
    return {name.lower(): value for name, value in (line.split(": ", 1) for line in head)}


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize(("command", "shown"), EXAMPLES, ids=[c[:60] for c, _ in EXAMPLES])
def test_readme_example_runs_as_written(server: LiveServer, tmp_path: Path, command: str, shown: list[str]) -> None:
    # A working directory like the repository root (the sample files); the command must write nothing there.
    root = tmp_path / "root"
    root.mkdir()
    for name in ("tests", "examples"):
        (root / name).symlink_to(ROOT / name)
    wrapper = tmp_path / "bin" / "curl"
    wrapper.parent.mkdir()
    wrapper.write_text(
        f'#!/bin/sh\nexec {CURL} --show-error "$@" --write-out "%{{stderr}}@@ %{{http_code}} %{{content_type}}\\n"\n'
    )
    wrapper.chmod(0o755)
    address = server.url.removeprefix("http://")
    run = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.replace("localhost:8000", address)],
        cwd=root,
        env={"PATH": f"{wrapper.parent}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = re.search(r"^@@ (\d{3}) (\S*)", run.stderr, re.M)
    assert report, f"exit {run.returncode}: {run.stderr[-2000:]}"
    expected = expectation(shown)
    assert int(report.group(1)) == expected.status, run.stdout[:500]
    assert report.group(2).split(";")[0] == expected.content_type
    if expected.body is not None:
        assert differences(expected.body, json.loads(run.stdout)) == [], run.stdout[:2000]
    if expected.prefix is not None:
        assert run.stdout == expected.prefix
    if expected.headers:
        headers = sent_headers(run.stdout)
        assert set(expected.headers) <= set(headers), headers
        for name, value in expected.headers.items():
            assert name in VARYING_HEADERS or headers[name] == value, (name, headers[name])
    assert sorted(p.name for p in root.iterdir()) == ["examples", "tests"], "the command wrote into the repository"


def python_example(heading: str) -> str:
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, heading
    return str(blocks[0])


def test_the_python_client_example_runs_as_written_and_prints_what_it_says(server: LiveServer) -> None:
    code = python_example("Python client")
    run = subprocess.run(
        [sys.executable, "-c", code.replace("http://localhost:8000", server.url)],
        cwd=ROOT,  # it reads tests/media/cat.jpg, and writes nothing
        env={**os.environ, "PYTHONPATH": str(ROOT / "client")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout.splitlines()
    said = [line.strip().removeprefix("# ") for line in code.splitlines() if line.strip().startswith("# ")]
    assert len(printed) == 3, printed  # the sync client's two prints, then the async one's
    assert [printed[0], printed[2]] == said, (printed, said)


def test_the_sample_frames_move_by_the_stated_shift_and_the_clip_has_sound() -> None:
    import av
    import numpy as np
    from PIL import Image

    first, second = (np.asarray(Image.open(ROOT / "examples" / f"frame{i}.png")) for i in (1, 2))
    dx, dy = 6, 3  # examples/README.md
    assert first.shape == second.shape == (360, 480, 3)
    assert np.array_equal(second[dy:, dx:], first[:-dy, :-dx])  # content at (x, y) moved to (x + dx, y + dy)
    assert not np.array_equal(second, first)
    with av.open(str(ROOT / "examples" / "clip.mp4")) as container:
        kinds = {s.type: s for s in container.streams}
        assert set(kinds) == {"video", "audio"}
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 25  # one second at 25 fps
