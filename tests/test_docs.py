"""The docs stay navigable: a short README, links that resolve, make targets that exist."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 10_000  # characters: what a newcomer reads in five minutes; depth goes to docs/
LINKED_DOCS = sorted([README, ROOT / "client" / "README.md", ROOT / "load_tests" / "README.md",
                      *(ROOT / "docs").glob("*.md")])
MOVED = ("docs/architecture.md", "docs/performance.md", "docs/deployment.md", "client/README.md")

_LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_MAKE = re.compile(r"\bmake ([a-z][a-z0-9_-]*)")
_MAKE_RULE = re.compile(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?![=:])", re.M)
COMING = "(coming)"


def _links(path: Path) -> List[str]:
    return _LINK.findall(_FENCE.sub("", path.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    seen: Dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _code(text: str) -> List[Tuple[str, str]]:
    """(code, the line it is on) for every fenced block line and inline code span."""
    found = []
    for block in _FENCE.findall(text):
        found += [(line, line) for line in block.splitlines()]
    for line in _FENCE.sub("", text).splitlines():
        found += [(span, line) for span in _CODE_SPAN.findall(line)]
    return found


def _makefile_targets() -> Set[str]:
    targets = set()
    for names in _MAKE_RULE.findall((ROOT / "Makefile").read_text()):
        targets.update(name for name in names.split() if not name.startswith((".", "$")))
    return targets


def test_readme_is_short():
    length = len(README.read_text())
    assert length < README_LIMIT, f"README.md has {length} characters (limit {README_LIMIT}): move depth to docs/"


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert doc.exists(), doc
    broken = []
    for link in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_every_moved_section_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    missing = [doc for doc in MOVED if (ROOT / doc).resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_make_targets_named_in_the_readme_exist():
    targets = _makefile_targets()
    assert {"serve", "test", "lint"} <= targets, targets  # the parser still reads the Makefile
    named: Dict[str, bool] = {}  # target -> announced as coming
    for code, line in _code(README.read_text()):
        for target in _MAKE.findall(code):
            named[target] = named.get(target, False) or COMING in line
    missing = sorted(t for t, coming in named.items() if not coming and t not in targets)
    landed = sorted(t for t, coming in named.items() if coming and t in targets)
    assert not missing, f"README.md names make targets the Makefile lacks: {missing}"
    assert not landed, f"README.md still marks these targets {COMING}, but the Makefile has them now: {landed}"
