"""The docs are held to the code: the settings reference is what the generator renders from
the declarations, and every link between the pages points at a file (and a heading) that
exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from downloader.configdoc import BEGIN, END, main, render, settings_tables
from downloader.settings import known_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted(ROOT.glob("docs/*.md"))]

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$", re.M)


def test_the_settings_reference_is_what_the_generator_renders() -> None:
    page = CONFIGURATION.read_text(encoding="utf-8")
    assert render(page) == page, "docs/configuration.md is stale: python -m downloader.configdoc"


def test_the_settings_reference_has_a_row_for_every_declared_setting() -> None:
    page = CONFIGURATION.read_text(encoding="utf-8")
    generated = page.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = re.findall(r"^\| `([a-z_.]+)` \|", generated, re.M)
    assert sorted(rows) == sorted(known_keys())
    assert "http.user_agent" in rows


def test_a_row_shows_what_its_declaration_says() -> None:
    tables = settings_tables()
    assert (
        "| `http.timeout` | `--timeout` | `30` | a number, above 0, at most 86400 | "
        "Deadline per request in seconds, redirects and body included. |"
    ) in tables
    assert "| `progress` | `-q/--quiet` sets `false` | `true` |" in tables
    assert "| `service.port` | `service --port` | `8800` | an integer, 0 to 65535 |" in tables
    assert "| `server.latency_ms` | `--latency-ms` (`download`, `serve`) | `0` |" in tables
    assert "| `backend` | `--backend` | `asyncio` | `sync`, `threads`, `asyncio`," in tables


def test_the_generator_rewrites_a_stale_page_and_check_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "configuration.md"
    stale = f"# Configuration\n\nprose\n\n{BEGIN}\n| `old` | row |\n{END}\n\nmore prose\n"
    page.write_text(stale, encoding="utf-8")

    assert main(["--check", str(page)]) == 1
    assert page.read_text(encoding="utf-8") == stale
    assert "out of date" in capsys.readouterr().err

    assert main([str(page)]) == 0
    written = page.read_text(encoding="utf-8")
    assert written == render(stale)
    assert written.startswith("# Configuration\n\nprose\n\n")
    assert written.endswith(f"{END}\n\nmore prose\n")
    assert "`old`" not in written and "`http.user_agent`" in written
    assert main(["--check", str(page)]) == 0


@pytest.mark.parametrize("text", [None, "# a page without the markers\n"])
def test_the_generator_refuses_a_missing_page_or_one_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None
) -> None:
    page = tmp_path / "configuration.md"
    if text is not None:
        page.write_text(text, encoding="utf-8")
    assert main([str(page)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert page.exists() == (text is not None)
    if text is not None:
        assert page.read_text(encoding="utf-8") == text


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_the_pages_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/configuration.md", "docs/service.md"} <= names
    assert {"docs/architecture.md", "benchmarks/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_of_a_page_points_at_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_check_sees_links_and_anchors() -> None:
    readme = ROOT / "README.md"
    assert "docs/configuration.md" in links(readme)
    assert "docs/screenshot.png" in links(readme)
    assert "docs/service.md#running-it" in links(readme)
    assert {"quick-start", "python-api", "run-as-a-service"} <= anchors(readme)
    assert slug("hybrid's pool vs the shard model (`download compare`)") == (
        "hybrids-pool-vs-the-shard-model-download-compare"
    )
    assert slug("Measured here: against other tools") == "measured-here-against-other-tools"
