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


def test_every_finding_is_in_the_contents():
    text = (ROOT / "docs" / "findings.md").read_text()
    headings = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert len(headings) > 30
    assert all(f"](#{slug(h)})" in text for h in headings)
