"""Every curl in the README runs as written, from the repository root, against a live demo server.

Each command runs in bash with `localhost:8000` pointed at the test server and `curl` wrapped to report
the status and content type on stderr. What the README shows after the command says what to expect:
response headers (`-D -`), a `-w` status line, an error body, or a JSON body (whose top-level fields
must be the ones the server sends).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
CURL = shutil.which("curl")
STATUS_BY_ERROR = {
    "invalid_input": 422,
    "not_found": 404,
    "unsupported_media_type": 415,
    "bad_request": 400,
    "payload_too_large": 413,
}


def examples() -> list[tuple[str, list[str]]]:
    """(command, the lines the README shows after it) for each `$ curl` in a console block."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
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


def expectation(shown: list[str]) -> tuple[int, str, object]:
    """(status, content type, shown JSON or None) from what the README prints after a command."""
    text = "\n".join(shown)
    if status := re.search(r"^HTTP/1\.1 (\d{3})", text, re.M):
        content_type = re.search(r"^content-type: (\S+)", text, re.M)
        assert content_type, text
        return int(status.group(1)), content_type.group(1), None
    if line := re.fullmatch(r"(\d{3}) (\S+)", shown[0]):
        return int(line.group(1)), line.group(2), None
    if shown[0].startswith("{"):
        try:
            body = json.loads(shown[0].replace("[...]", "[]").replace(", ...]", "]"))
        except json.JSONDecodeError:
            body = None  # cut short in the README (| head -c 120)
        if isinstance(body, dict) and "error" in body:
            return STATUS_BY_ERROR[body["error"]["type"]], "application/json", body
        return 200, "application/json", body
    return 200, "text/plain", None  # /metrics


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize(("command", "shown"), EXAMPLES, ids=[c[:60] for c, _ in EXAMPLES])
def test_readme_example_runs_as_written(
    demo_server: LiveServer, tmp_path: Path, command: str, shown: list[str]
) -> None:
    # A working directory like the repository root (the sample files), where output files may land.
    for name in ("tests", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    wrapper = tmp_path / "bin" / "curl"
    wrapper.parent.mkdir()
    wrapper.write_text(
        f'#!/bin/sh\nexec {CURL} --show-error "$@" --write-out "%{{stderr}}@@ %{{http_code}} %{{content_type}}\\n"\n'
    )
    wrapper.chmod(0o755)
    address = demo_server.url.removeprefix("http://")
    run = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.replace("localhost:8000", address)],
        cwd=tmp_path,
        env={"PATH": f"{wrapper.parent}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = re.search(r"^@@ (\d{3}) (\S*)", run.stderr, re.M)
    assert report, f"exit {run.returncode}: {run.stderr[-2000:]}"
    status, content_type, body = expectation(shown)
    assert int(report.group(1)) == status, run.stdout[:500]
    assert report.group(2).split(";")[0] == content_type
    if isinstance(body, dict):
        assert set(json.loads(run.stdout)) == set(body), run.stdout[:500]


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
