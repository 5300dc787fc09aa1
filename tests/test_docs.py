"""The documentation stands on its own: every relative link in README.md and docs/*.md resolves inside
the repository (file and, for a Markdown target, #section), and no file cites the design note that lived outside it (../shared/DESIGN.md).
Fast: text only, no model."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are not links here
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out, seen = set(), {}
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def test_the_docs_exist():
    for name in ("architecture.md", "formats.md", "benchmarks.md", "LOG.md"):
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: … are not ours to check
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no section #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_readme_points_to_the_design_docs():
    targets = {t.partition("#")[0] for t in links(ROOT / "README.md")}
    assert {"docs/architecture.md", "docs/formats.md", "docs/benchmarks.md", "docs/LOG.md"} <= targets


def test_no_reference_to_a_design_note_outside_the_repository():
    files = [*DOCS, *(ROOT / "alignloop").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
             *(ROOT / "scripts").glob("*"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "experiments").glob("*.py")]
    me = Path(__file__).resolve()
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files if f.is_file() and f.resolve() != me
            for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if "DESIGN.md" in line]
    assert not hits, "cites a file outside the repository: " + ", ".join(hits)


def test_docs_paths_cited_in_code_exist():
    """`docs/<name>.md` in a docstring or comment names a file that is there."""
    cited = {m for f in (ROOT / "alignloop").rglob("*.py")
             for m in re.findall(r"docs/[\w.-]+\.md", f.read_text(encoding="utf-8"))}
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing
