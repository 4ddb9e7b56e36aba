"""The documentation stands alone: its relative links and anchors resolve inside the repository, the README stays
short, and nothing cites the design notes under their old out-of-repository name."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_BYTES = 15 * 1024
# Built from pieces so that this file does not itself mention the old name.
OLD_DESIGN_NAME = "DESIGN" + ".md"

LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def markdown_files() -> list[str]:
    files = [os.path.join(REPO, "README.md")]
    for root, _, names in os.walk(os.path.join(REPO, "docs")):
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".md")]
    return files


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than - and _ removed, spaces -> -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    with open(path, encoding="utf-8") as f:
        text = without_code_blocks(f.read())
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(text):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def relative_links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = without_code_blocks(f.read())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_slug_follows_github_rules():
    assert slug("Does it fit: ahead-of-time compiles (from this CPU host)") == (
        "does-it-fit-ahead-of-time-compiles-from-this-cpu-host"
    )
    assert slug("The tiny config learns (`configs/sft_tiny.py`)") == "the-tiny-config-learns-configssft_tinypy"
    assert slug("Why batch 8 at 2× and search at 5×") == "why-batch-8-at-2-and-search-at-5"


def test_links_are_found_outside_code_only():
    text = "see [a](x.md#b) and [`c`](d/e.md)\n```\n[not](a-link.md)\n```\n[web](https://example.com)"
    assert LINK.findall(without_code_blocks(text)) == ["x.md#b", "d/e.md", "https://example.com"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_and_anchors_resolve(path):
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not resolved.startswith(REPO + os.sep) and resolved != REPO:
            problems.append(f"{target}: outside the repository")
            continue
        if not os.path.exists(resolved):
            problems.append(f"{target}: no such file")
            continue
        if anchor:
            if not resolved.endswith(".md"):
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(resolved):
                problems.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(resolved, REPO)}")
    assert not problems, "\n".join(problems)


def test_docs_have_links_to_check():
    # The link test above must not pass vacuously: the README links into docs/ and docs/ into its results.
    readme = relative_links(os.path.join(REPO, "README.md"))
    assert any(t.startswith("docs/design.md") for t in readme)
    assert any(t.startswith("docs/results/") for t in readme)


def test_readme_is_short():
    size = os.path.getsize(os.path.join(REPO, "README.md"))
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        paths = [p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but build and VCS folders
        skip = {".git", ".venv", ".venv-ci", "build", "dist", "__pycache__", ".pytest_cache"}
        paths = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
    return [p for p in paths if os.path.isfile(os.path.join(REPO, p))]


def test_no_file_cites_the_design_notes_by_their_old_name():
    offenders = []
    for rel in tracked_text_files():
        with open(os.path.join(REPO, rel), "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary
            continue
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if OLD_DESIGN_NAME in line:
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "cite docs/design.md instead:\n" + "\n".join(offenders)
