"""The docs cannot drift: generated tables match the committed results, links resolve, the README stays short."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _report() -> ModuleType:
    """benchmarks/report.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("splitgate_docs_report", ROOT / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks (their brackets and # lines are not links or headings)."""
    return _FENCE.sub("", text)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to hyphens)."""
    seen: dict[str, int] = {}
    anchors = set()
    for title in _HEADING.findall(_prose(text)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_generated_sections_are_what_the_committed_results_give() -> None:
    report = _report()
    stale = report.update_docs(DOCS, RESULTS, check=True)
    assert not stale, (
        f"{[str(p.relative_to(ROOT)) for p in stale]} differ from benchmarks/results/*.json: "
        "run `.venv/bin/python benchmarks/report.py` and commit the docs"
    )


def test_every_result_file_has_a_table_in_performance_md() -> None:
    report = _report()
    text = (DOCS / "performance.md").read_text()
    used = set()
    for name in report.sections_in(text):
        used |= set(re.findall(r"benchmarks/results/([\w.-]+\.json)", report.render(name, RESULTS)))
    missing = sorted(p.name for p in RESULTS.glob("*.json") if p.name not in used)
    assert not missing, f"result files with no generated table in docs/performance.md: {missing}"


def test_performance_md_has_no_table_outside_generated_sections() -> None:
    report = _report()
    text = (DOCS / "performance.md").read_text()
    outside = report._MARKER.sub("", _prose(text))
    rows = [line for line in outside.splitlines() if line.lstrip().startswith("|")]
    assert not rows, f"hand-typed table rows in docs/performance.md: {rows[:3]}"


def test_fill_refuses_an_unclosed_marker_and_an_unknown_section() -> None:
    report = _report()
    with pytest.raises(report.ReportError, match="has no '<!-- /generated:faults -->'"):
        report.fill("x\n<!-- generated:faults -->\n| stale |\n", RESULTS)
    with pytest.raises(report.ReportError, match="unknown generated section 'nope'"):
        report.fill("<!-- generated:nope -->\n<!-- /generated:nope -->\n", RESULTS)


def test_fill_replaces_only_between_the_markers(tmp_path: Path) -> None:
    report = _report()
    (tmp_path / "edge_overhead.json").write_text(
        '{"models": {"m": {"raw_session_run_p50_ms": 1.0, "gateway_infer_p50_ms": 1.5, "overhead_ms": 0.5,'
        ' "ratio": 1.5, "within_bar": false, "repeats": 7}}}'
    )
    text = "before\n<!-- generated:edge_overhead -->\nold\n<!-- /generated:edge_overhead -->\nafter\n"
    out = report.fill(text, tmp_path)
    assert out.startswith("before\n<!-- generated:edge_overhead -->\n| model |")
    assert out.endswith("<!-- /generated:edge_overhead -->\nafter\n")
    assert "| m | 1.000 ms | 1.500 ms | **0.500 ms** | 1.50x | **no** | 7 |" in out
    assert "old" not in out


def test_readme_is_at_most_250_lines() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; keep it a front door and move detail to docs/"


def test_readme_links_every_docs_page() -> None:
    linked = {Path(t.split("#")[0]).name for t in _LINK.findall(_prose(README.read_text())) if t.startswith("docs/")}
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.name not in linked)
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target} (no heading '#{anchor}' in {dest.name})")
    assert not broken, f"{page.name}: broken links: {broken}"
