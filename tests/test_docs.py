"""The hand-written documents' links: every relative file link exists and every #anchor names a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "findings.md", ROOT / "docs" / "conventions.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings."""
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_slug_follows_github():
    assert slug("Two models' boxes pooled (`TileConfig.partners`; `--vote-iou 0.5`)") == \
        "two-models-boxes-pooled-tileconfigpartners---vote-iou-05"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_point_at_existing_files_and_headings(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_headings_stand_apart_from_the_text_above(doc):
    lines, fenced = doc.read_text().splitlines(), False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and i and re.match(r"#{1,6} ", line):
            # A one-line HTML comment (the generated tables' marker) ends its own block, as a blank line would.
            assert lines[i - 1] == "" or re.fullmatch(r"<!--.*-->", lines[i - 1]), \
                f"{doc.name}:{i + 1}: no blank line before {line!r}"


def test_every_finding_is_in_the_contents():
    text = (ROOT / "docs" / "findings.md").read_text()
    headings = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert len(headings) > 30
    assert all(f"](#{slug(h)})" in text for h in headings)


def test_every_test_named_in_the_bad_input_table_exists():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    sources = {p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    assert len(rows) > 20
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        names = re.findall(r"`(?:(tests/test_\w+\.py)(?:::)?)?(test_\w+)?`", cell)
        assert names, f"no test named in: {row[:80]}"
        for file, name in names:
            if file:
                assert file in sources, f"{file} does not exist"
            if name:
                where = [sources[file]] if file else sources.values()
                assert any(re.search(rf"^def {name}\(", s, re.M) for s in where), f"{name} not found ({row[:60]})"
