"""The documentation ships with the package: every ``docs/...`` reference in the repository names an
existing file and heading, and nothing cites the design briefs that live outside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCANNED = ["hf_chts", "tests", "bench", "recipes", "docs", ".ci", "README.md", "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".jsonl", ".csv", ".cfg", ".ini", ""}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}

# docs/<name>.md, optionally followed by #anchor or " §N" / " §N.M"
DOC_REFERENCE = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+)|\s§(\d+(?:\.\d+)*))?")
# relative links inside the docs: [text](file.md#anchor), [text](#anchor)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]*)\)")
# outside documents the code must not cite (split so that this file does not cite them either)
FORBIDDEN = ["ALGORITHMS" + ".md", "DESIGN" + ".md", "../" + "shared", "/work/" + "shared", "papers/" + "chts"]


def repository_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)
            )
    return files


def numbered_lines(file: Path):
    """``(line number, line)`` of a text file (undecodable bytes replaced)."""
    return enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def headings(markdown: Path) -> list[str]:
    """The text of every heading outside fenced code blocks."""
    found, fenced = [], False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.append(match.group(1))
    return found


def anchors(markdown: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(markdown):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        result.add(anchor if count == 0 else f"{anchor}-{count}")
        seen[anchor] = count + 1
    return result


def section_numbers(markdown: Path) -> set[str]:
    """``"3"``, ``"3.2"`` for headings like ``## 3. Link removal`` / ``### 3.2 Sampling``."""
    return {m.group(1) for h in headings(markdown) if (m := re.match(r"(\d+(?:\.\d+)*)\.?\s", h))}


def doc_references() -> list[tuple[Path, int, str, str | None, str | None]]:
    references = []
    for file in repository_files():
        for number, line in numbered_lines(file):
            for match in DOC_REFERENCE.finditer(line):
                references.append((file, number, match.group(1), match.group(2), match.group(3)))
    return references


def problems_of(reference) -> list[str]:
    file, number, name, anchor, section = reference
    where = f"{file.relative_to(ROOT)}:{number}: docs/{name}"
    target = DOCS / name
    if not target.is_file():
        return [f"{where} does not exist"]
    if anchor is not None and anchor not in anchors(target):
        return [f"{where}#{anchor}: no such heading (headings: {sorted(anchors(target))})"]
    if section is not None and section not in section_numbers(target):
        return [f"{where} §{section}: no heading numbered {section}"]
    return []


def test_docs_exist_and_the_index_lists_them():
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert {"algorithms.md", "checkpoint-format.md", "distributed.md"} <= set(pages)
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    assert all(f"]({page})" in index for page in pages)


def test_the_code_cites_the_docs():
    cited = {name for _, _, name, _, _ in doc_references()}
    assert {"algorithms.md", "checkpoint-format.md", "distributed.md"} <= cited


def test_every_docs_reference_points_to_an_existing_file_and_heading():
    problems = [problem for reference in doc_references() for problem in problems_of(reference)]
    assert not problems, "\n".join(problems)


def test_links_inside_the_docs_resolve():
    problems = []
    for page in sorted(DOCS.glob("*.md")):
        for target in MARKDOWN_LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                problems.append(f"{page.name}: link to {target}: {path} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{page.name}: link to {target}: no heading with anchor {anchor!r}")
    assert not problems, "\n".join(problems)


def test_nothing_cites_documents_outside_the_repository():
    problems = []
    for file in repository_files():
        for number, line in numbered_lines(file):
            problems += [f"{file.relative_to(ROOT)}:{number}: cites {word}" for word in FORBIDDEN if word in line]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("heading", "anchor"), [
    ("3. Link removal", "3-link-removal"),
    ("3.2 Sampling without replacement", "32-sampling-without-replacement"),
    ("3. `sparsify_config.json`", "3-sparsify_configjson"),
    ("9. Paper, released code and parity", "9-paper-released-code-and-parity"),
    ("See [the docs](x.md) here", "see-the-docs-here"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor
