"""The design document ships with the repository and every reference to it holds.

Code comments, docstrings, tests, recipes, benchmarks and the README cite ``docs/design.md §N.M``; each
cited section must exist in docs/design.md, and nothing may cite the old external design notes any more.
The document's own claims that can be checked mechanically are checked too: its section cross-references,
the test functions it names as the specification and the source files it names exist.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SKIP_DIRS = {".git", ".venv", "build", "dist", "outputs", "runs", "wandb", "__pycache__", ".pytest_cache",
             ".ruff_cache", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".sbatch", ".cfg", ".ini", ".rst"}
TEXT_NAMES = {"Makefile"}

NUMBER = r"\d+(?:\.\d+)*"
HEADING = re.compile(rf"^#{{2,4}}\s+({NUMBER})\.?\s+\S", re.MULTILINE)
REFERENCE = re.compile(rf"docs/design\.md\s*§\s*({NUMBER})(?:\s*[-–]\s*§?\s*({NUMBER}))?")
INTERNAL = re.compile(rf"§\s*({NUMBER})(?:\s*[-–]\s*§?\s*({NUMBER}))?")
LEGACY = re.compile("DESIGN" + r"(?:\.md)?\b")  # the external notes' name, written so this file does not match
CITED_TEST = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")
CITED_SOURCE = re.compile(r"\b((?:ar2dlm|benchmarks|recipes|launch|scripts)/[\w/.-]+\.(?:py|yaml|sh|sbatch))\b")


def _repository_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in relative.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            found.append(path)
    return sorted(found)


def _sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def _references(pattern: re.Pattern, text: str) -> list[str]:
    cited = []
    for match in pattern.finditer(text):
        cited += [number for number in match.groups() if number]
    return cited


def test_the_design_document_exists_with_numbered_sections():
    assert DESIGN.is_file(), "docs/design.md is missing"
    sections = _sections()
    assert {"1", "2", "2.1", "2.2", "2.3", "2.4", "2.5"} <= sections, sorted(sections)


def test_every_reference_names_a_section_of_the_design_document():
    sections = _sections()
    missing = []
    for path in _repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        pattern = INTERNAL if path == DESIGN else REFERENCE
        missing += [f"{path.relative_to(ROOT)}: §{number}" for number in _references(pattern, text)
                    if number not in sections]
    assert not missing, "references to sections docs/design.md does not have:\n" + "\n".join(missing)


def test_the_code_cites_the_design_document():
    citing = {path.relative_to(ROOT).as_posix() for path in _repository_files()
              if path != DESIGN and REFERENCE.search(path.read_text(encoding="utf-8", errors="replace"))}
    for expected in ("README.md", "ar2dlm/model/masks.py", "ar2dlm/training/noise.py", "ar2dlm/training/loss.py",
                     "ar2dlm/conversion/mask_token.py", "ar2dlm/runtime/decoding_ar2dlm.py"):
        assert expected in citing, f"{expected} does not cite docs/design.md"


def test_nothing_refers_to_the_external_design_notes():
    this_file = Path(__file__).resolve()
    offending = []
    for path in _repository_files():
        if path.resolve() == this_file:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if LEGACY.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "cite docs/design.md instead:\n" + "\n".join(offending)


def test_the_readme_links_the_design_document():
    assert "docs/design.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_tests_and_files_the_design_document_names_exist():
    text = DESIGN.read_text(encoding="utf-8")
    cited_tests = CITED_TEST.findall(text)
    assert cited_tests, "the design document names the equivalence tests that specify the method"
    missing = []
    for file, name in cited_tests:
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(encoding="utf-8"), re.MULTILINE):
            missing.append(f"{file}::{name}")
    missing += [source for source in CITED_SOURCE.findall(text) if not (ROOT / source).is_file()]
    assert not missing, "docs/design.md names tests or files that do not exist:\n" + "\n".join(missing)
