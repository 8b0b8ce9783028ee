"""The documentation holds together.

* Every reference to docs/original.md lands on a section or quirk id that the document has.
* The README opens with the two commands CI runs, stays short, and links every page in docs/;
  every relative link in README.md and docs/ resolves (file and heading); neither holds absolute
  paths of a local machine nor work-log phrasing.
"""
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


# ---------------------------------------------------------------------------------------------
# The README is the front door, docs/ holds the reference material.

README = REPO / "README.md"
DOCS = REPO / "docs"
CI = REPO / ".ci" / "run"
README_MAX_LINES = 220
# What a work log says and a reference document does not.
LOG_PHRASES = ("this session", "latest session", "earlier session", "tried and not kept",
               "not re-measured", "no gpu was lent")

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_MD_HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)
# An absolute file-system path: a "/" that starts a path (not inside a word, a URL, a relative
# path or "~/"), followed by at least one named folder.
_ABS_PATH = re.compile(r"(?<![\w.:/~\-])/[A-Za-z_][\w.-]*/|\b[A-Za-z]:\\\\?[\w.-]+")


def _doc_files():
    return [README] + sorted(DOCS.glob("*.md"))


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set:
    seen, out = {}, set()
    for h in _MD_HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        s = _slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def _ci_command(pattern: str) -> str:
    """The one command of .ci/run that matches ``pattern``, without leading VAR=value settings."""
    lines = [ln.strip() for ln in CI.read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    hits = [re.sub(r"^(?:\w+=\S*\s+)+", "", ln) for ln in lines if re.search(pattern, ln)]
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def test_readme_opens_with_the_two_commands_that_ci_runs():
    text = README.read_text(encoding="utf-8")
    first = _FENCE.search(text)
    assert first, "the README has no fenced code block"
    # nothing but the title comes before it
    before = [ln for ln in text[:first.start()].splitlines() if ln.strip()]
    assert before == ["# qkformer"], before
    commands = [ln for ln in first.group(1).splitlines() if ln.strip()]
    assert len(commands) == 2, commands
    install, test = commands
    # the test command is exactly the one .ci/run runs
    assert test == _ci_command(r"python -m pytest"), test
    # the install is .ci/run's (less its quiet flag), followed by the demo
    ci_install = _ci_command(r"pip install .* -e ").replace(" -q", "")
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && "), install
    steps = [s.strip() for s in install.split("&&")]
    assert ci_install in steps, (ci_install, steps)
    assert steps[-1] == "python -m qkformer.demo", steps


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; move detail into docs/"


def test_readme_links_every_doc():
    docs = sorted(p.name for p in DOCS.glob("*.md"))
    assert {"original.md", "performance.md", "memory.md", "gpu.md", "analysis.md",
            "testing.md"} <= set(docs), docs
    links = {link.split("#")[0] for link in _LINK.findall(_prose(README.read_text(encoding="utf-8")))}
    unlinked = [d for d in docs if f"docs/{d}" not in links]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_relative_links_resolve():
    checked, broken = 0, []
    for f in _doc_files():
        for link in _LINK.findall(_prose(f.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
                continue
            target, _, anchor = link.partition("#")
            path = (f.parent / target).resolve() if target else f
            checked += 1
            if not path.exists():
                broken.append(f"{f.relative_to(REPO)}: {link} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{f.relative_to(REPO)}: {link} (no such heading)")
    assert checked >= 10, checked  # the scan finds the links there are
    assert not broken, "\n".join(broken)


def test_no_absolute_local_paths():
    hits = [f"{f.relative_to(REPO)}:{i}: {m.group(0)}" for f in _doc_files()
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            for m in [_ABS_PATH.search(line)] if m]
    assert not hits, "absolute paths of a local machine:\n" + "\n".join(hits)


def test_no_work_log_phrasing():
    hits = [f"{f.relative_to(REPO)}:{i}: {phrase!r}" for f in _doc_files()
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            for phrase in LOG_PHRASES if phrase in line.lower()]
    assert not hits, "work-log phrasing in the documentation:\n" + "\n".join(hits)
