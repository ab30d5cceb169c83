"""docs/loop.md against the code it documents: every loop setting in its settings table with the default the
code has, every metric the loop registers, every relative link (and its anchor) resolving, and the Korean
section in place; the README and the Korean guide link to it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from visionloop.config import LoopSettings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LOOP_DOC = DOCS / "loop.md"
KOREAN_HEADING = "## 한국어 안내"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def prose(path: Path) -> str:
    """The Markdown without its code blocks (a `#` comment in a shell block is not a heading)."""
    return FENCE.sub("", path.read_text())


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\w*_)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(h) for h in HEADING.findall(prose(path))}


def shown(value: object) -> str:
    """A default as the settings table writes it."""
    if value == "":
        return '""'
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def settings_table() -> dict[str, str]:
    """``loop.<name>`` → the default its row gives, from the rows of docs/loop.md's tables."""
    rows = re.findall(r"^\| `loop\.(\w+)` \| `([^`]*)` \|", LOOP_DOC.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_every_loop_setting_has_a_row_with_the_default_the_code_has():
    table = settings_table()
    fields = LoopSettings.model_fields
    missing = sorted(f"loop.{name}" for name in fields if name not in table)
    assert not missing, f"docs/loop.md's settings table has no row for {missing}"
    unknown = sorted(f"loop.{name}" for name in table if name not in fields)
    assert not unknown, f"docs/loop.md documents settings the code does not have: {unknown}"
    wrong = {
        f"loop.{name}": (table[name], shown(field.default))
        for name, field in fields.items()
        if table[name] != shown(field.default)
    }
    assert not wrong, f"defaults in docs/loop.md (doc, code) differ: {wrong}"


def test_every_loop_metric_is_documented():
    from visionloop.loop.metrics import LoopMetrics

    text = LOOP_DOC.read_text()
    names = set()
    for family in LoopMetrics().registry.collect():
        if family.name.startswith("process_"):
            continue
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    assert names, "LoopMetrics registers no metrics?"
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"docs/loop.md's metrics table lacks {missing}"


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.IGNORECASE)]


@pytest.mark.parametrize(
    "doc",
    [LOOP_DOC, ROOT / "README.md", DOCS / "ko" / "README.md", DOCS / "monitoring.md", DOCS / "serving.md",
     ROOT / "deploy" / "monitoring" / "README.md"],
    ids=lambda p: str(p.relative_to(ROOT)),
)  # fmt: skip
def test_relative_links_resolve_to_files_and_headings(doc: Path):
    links = relative_links(doc)
    assert links, f"{doc.name} has no relative links?"
    broken = []
    for target in links:
        page, _, fragment = target.partition("#")
        file = (doc.parent / page).resolve() if page else doc
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_korean_section_is_a_guide_before_the_runbooks():
    text = LOOP_DOC.read_text()
    assert KOREAN_HEADING in text, f"docs/loop.md has no '{KOREAN_HEADING}' section"
    start = text.index(KOREAN_HEADING)
    assert start < text.index("\n## Runbooks"), "the Korean section belongs before the runbooks"
    section = text[start : text.index("\n## Runbooks")]
    assert len(re.findall(r"[\uac00-\ud7a3]", section)) > 1000, "the Korean section is too short to be a guide"
    for term in ("재학습 트리거", "품질 게이트", "사후 분석", "롤백", "make demo", "loop history"):
        assert term in section, f"the Korean section does not cover {term!r}"


def test_the_readmes_point_at_the_loop_guide():
    assert "docs/loop.md" in relative_links(ROOT / "README.md")
    assert "../loop.md" in {t.partition("#")[0] for t in relative_links(DOCS / "ko" / "README.md")}
