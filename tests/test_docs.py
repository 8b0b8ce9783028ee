"""Every reference to docs/original.md lands on a section or quirk id that the document has."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "original.md"
SEARCHED = ("qkformer", "tests", "imagenet", "cifar10", "cifar100", "cifar10_dvs",
            "dvs128_gesture", "benchmarks", "docs", "README.md", "setup.py")
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".json", ".cu", ".txt", ".cfg", ".toml"}

_HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.M)
_QUIRK_ROW = re.compile(r"^\| (Q\d+) \|", re.M)
# What follows "docs/original.md": e.g. " §2.5, Q1", " §6.1/§6.2", " §2.2-2.5", " Q9".
_AFTER = re.compile(r"docs/original\.md([ §Q0-9.,/\-]*)")
_SECTION_REF = re.compile(r"§(\d+(?:\.\d+)?)(?:-§?(\d+(?:\.\d+)?))?")
_QUIRK_REF = re.compile(r"\bQ(\d+)\b")


def _targets():
    text = DOC.read_text(encoding="utf-8")
    sections = _HEADING.findall(text)
    quirks = _QUIRK_ROW.findall(text)
    assert len(sections) == len(set(sections)), "a section number is used twice"
    assert len(quirks) == len(set(quirks)), "a quirk id is used twice"
    return set(sections), set(quirks)


def _refs_in(run: str):
    out = []
    for lo, hi in _SECTION_REF.findall(run):
        out += [f"§{lo}"] + ([f"§{hi}"] if hi else [])
    return out + [f"Q{n}" for n in _QUIRK_REF.findall(run)]


def _files():
    for entry in SEARCHED:
        path = REPO / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in candidates:
            if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts:
                yield f


def _all_references():
    refs = []  # (file, line, reference)
    for f in _files():
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            runs = [m.group(1) for m in _AFTER.finditer(line)]
            if f == DOC:  # the document's own cross-references carry no file name
                runs = [line] if not _HEADING.match(line + " ") else []
            for run in runs:
                refs += [(f.relative_to(REPO), i, r) for r in _refs_in(run.rstrip(". "))]
    return refs


def test_document_numbering():
    sections, quirks = _targets()
    assert quirks == {f"Q{i}" for i in range(1, 19)}
    top = {s for s in sections if "." not in s}
    assert top == {str(i) for i in range(10)}
    for s in sections - top:  # every subsection sits under an existing section
        assert s.split(".")[0] in top, s


def test_every_reference_exists():
    sections, quirks = _targets()
    known = {f"§{s}" for s in sections} | quirks
    refs = _all_references()
    # the scan itself works: it finds the references the code is known to make
    found = {r for _, _, r in refs}
    assert {"§2.5", "§1.4", "§3.2", "§3.4", "§6.1", "§9", "Q1", "Q9", "Q12"} <= found, found
    assert len(refs) > 40
    missing = [f"{f}:{i}: {r}" for f, i, r in refs if r not in known]
    assert not missing, "references to docs/original.md that do not exist:\n" + "\n".join(missing)


# The old places: the shared specification and reference data, and a top-level configs/ folder.
@pytest.mark.parametrize("stale", [r"\bSPEC\b", r"shared/reference",
                                   r"(?<![\w/\"])configs/\w+\.yml|`configs/`"])
def test_no_stale_pointers(stale):
    """The specification is docs/original.md, the reference data tests/reference, and the
    recipes package data (qkformer/configs): no file points at the old places."""
    assert not (REPO / "configs").exists()
    pattern = re.compile(stale)
    hits = [f"{f.relative_to(REPO)}:{i}" for f in _files() if f != Path(__file__)
            for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
