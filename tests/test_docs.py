"""The docs must keep telling the truth: the README about the settings, the two commands and the endpoints;
every link between the docs leads somewhere; the performance page opens with the current figures, each dated
and traceable to a commit and a command; and a claim made in two places gives one figure."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from app.settings import Settings, tuning_knobs
from app.tasks import TASKS

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PERFORMANCE = (ROOT / "docs" / "performance.md").read_text()
FIRST_SCREEN = PERFORMANCE.split("\n## ", 1)[0]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_setting_is_documented_in_its_table() -> None:
    """What an operator sets in the Settings table, the tuning knobs in theirs, and nothing twice."""
    settings = README.split("## Settings", 1)[1].split("### Tuning knobs", 1)
    knobs = settings[1].split("\n## ", 1)[0]
    tuning = tuning_knobs(Settings)
    assert tuning, "no setting is marked as a tuning knob"
    for name in Settings.model_fields:
        row = f"| `PERCEIVER_{name.upper()}` |"
        assert README.count(row) == 1, name
        assert row in (knobs if name in tuning else settings[0]), name


def test_every_endpoint_has_a_curl_example() -> None:
    for task in TASKS.values():
        assert f"localhost:8000{task.path}" in README, task.path
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
        assert f"localhost:8000{path}" in README


def test_the_two_commands_exist_and_ci_runs_the_test_one() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert "\nserve:" in makefile and "\ntest:" in makefile
    assert "torch==2.13.0" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# A measured figure: a percentage, a ratio (3-7x, 1.6×; not 368x496) or "from 157 to 44 ms".
FIGURE = re.compile(r"\d\s?%|\d(?:\.\d+)?[x×](?![\d\w])|\bfrom \d[\d.,]* to \d")


def test_settings_descriptions_point_to_the_docs_and_quote_no_figures() -> None:
    """Figures belong in docs/performance.md, where they carry their date and run; a description that quotes
    one goes stale with the next run (the CPU lanes' said 10-44% while the measured table said 10-31%)."""
    for name, field in Settings.model_fields.items():
        row = re.search(rf"^\| `PERCEIVER_{name.upper()}` \|.*$", README, re.M)
        assert row, name
        for text in (field.description or "", row.group(0)):
            assert not FIGURE.search(text), (name, FIGURE.search(text), text)


def headings(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in found else f"{slug}-1")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_link_between_the_docs_leads_somewhere(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: {target}"
        if anchor:
            assert anchor in headings(linked), f"{doc.name}: {target} (no such heading)"


def first_screen_rows() -> list[dict[str, str]]:
    table = [line for line in FIRST_SCREEN.splitlines() if line.startswith("|")]
    names = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [dict(zip(names, (cell.strip() for cell in row.strip("|").split("|")), strict=True)) for row in table[2:]]


def test_the_performance_page_opens_with_the_current_figures_on_one_screen() -> None:
    """Per head and front end: the figure, the machine, the date and commit, the command, and what bounds it;
    the history of runs behind them one link away."""
    assert len(FIRST_SCREEN.splitlines()) <= 40
    assert "(performance-history.md)" in FIRST_SCREEN
    rows = first_screen_rows()
    assert {"head", "front end", "machine", "current figure", "date, commit", "command", "bounded by"} == set(rows[0])
    heads = " ".join(row["head"] for row in rows)
    for head in ("image learned", "image Fourier", "image conv", "MLM", "flow", "multimodal", "classify-text"):
        assert head in heads, head
    fronts = " ".join(row["front end"] for row in rows)
    for front in ("model", "REST", "Open Inference Protocol"):
        assert front in fronts, front
    commands = set(re.findall(r"\[(\d)\]", FIRST_SCREEN.split("Commands", 1)[1]))
    for row in rows:
        if row["current figure"].startswith("not measured"):
            continue
        assert re.fullmatch(r"20\d\d-\d\d-\d\d, [0-9a-f]{7}", row["date, commit"]), row
        assert set(re.findall(r"\[(\d)\]", row["command"])) <= commands and row["command"], row
        assert row["bounded by"], row


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_every_commit_the_performance_page_cites_exists() -> None:
    for commit in re.findall(r"\b[0-9a-f]{7}\b", FIRST_SCREEN):
        found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert found.returncode == 0, commit


def test_a_claim_made_in_two_places_gives_one_figure() -> None:
    batching = re.search(r"([\d.–]+×) the throughput of `PERCEIVER_MAX_BATCH_SIZE=1` at 32", README)
    assert batching and f"batching {batching.group(1)} `max_batch_size=1`" in FIRST_SCREEN
    reliability = (ROOT / "docs" / "reliability.md").read_text()
    overload = re.search(r"at 30× capacity, goodput ([\d.–]+ req/s), p99 of the 200s ([\d.–]+ s)", reliability)
    assert overload, "docs/reliability.md states no 30× goodput"
    assert f"goodput {overload.group(1)}, p99 of the 200s {overload.group(2)}" in FIRST_SCREEN
    window = re.search(r"a window takes ([\d.–]+ s)", README)
    assert window and f"flow {window.group(1).removesuffix(' s')} s a window" in FIRST_SCREEN
