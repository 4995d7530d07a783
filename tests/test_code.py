"""app.py reads like a book: its table of contents is its banners, each section uses only what stands above it,
no section outgrows a sitting, and the code is formatted and linted the one way pyproject.toml says."""

import ast
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (ROOT / "app.py").read_text(encoding="utf-8")
BANNER = re.compile(r"^#{79}\n# (.+?) #+\n#{79}$", re.M)
LONGEST_SECTION = 650  # lines: "no section over about 600"


def sections():
    """[(title, first line, last line)] of app.py's banners, 1-based, in order."""
    found = [(match.group(1), SOURCE.count("\n", 0, match.start()) + 1) for match in BANNER.finditer(SOURCE)]
    ends = [line - 1 for _, line in found[1:]] + [SOURCE.count("\n") + 1]
    return [(title, start, end) for (title, start), end in zip(found, ends, strict=True)]


def contents():
    """The numbered entries of the module docstring's table of contents."""
    return re.findall(r"^\s+\d+\. (.+)$", ast.get_docstring(ast.parse(SOURCE)), re.M)


def defined_names(node):
    """The module-level names a top-level statement defines."""
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in sub.names}
        elif isinstance(sub, ast.Assign | ast.AnnAssign | ast.AugAssign):
            for target in sub.targets if isinstance(sub, ast.Assign) else [sub.target]:
                names |= {name.id for name in ast.walk(target) if isinstance(name, ast.Name)}
    return names


def used_names(node):
    """The names a statement reads when it runs (annotations are never evaluated here)."""
    annotations = {
        id(name)
        for sub in ast.walk(node)
        for part in (getattr(sub, "annotation", None), getattr(sub, "returns", None))
        if part is not None
        for name in ast.walk(part)
    }
    return {
        name.id
        for name in ast.walk(node)
        if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load) and id(name) not in annotations
    }


def test_the_table_of_contents_is_the_banners():
    assert contents() == [title for title, _, _ in sections()]


@pytest.mark.parametrize("title, start, end", sections(), ids=lambda value: str(value)[:40])
def test_no_section_outgrows_a_sitting(title, start, end):
    assert end - start < LONGEST_SECTION, f"{title} runs {end - start} lines: split it by concern"


def test_each_section_uses_only_what_stands_above_it():
    starts = [start for _, start, _ in sections()]
    titles = [title for title, _, _ in sections()]

    def section_of(line):
        return sum(start <= line for start in starts) - 1

    statements = ast.parse(SOURCE).body
    home = {}
    for node in statements:
        for name in defined_names(node):
            home.setdefault(name, section_of(node.lineno))
    later = sorted(
        f"{titles[section_of(node.lineno)]}: line {node.lineno} uses {name}, defined in {titles[home[name]]}"
        for node in statements
        for name in used_names(node) - defined_names(node)
        if home.get(name, -1) > section_of(node.lineno)
    )
    assert not later, "\n".join(later)


@pytest.mark.skipif(find_spec("ruff") is None, reason="ruff is not installed (pip install ruff; .ci/run does)")
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=" ".join)
def test_ruff_finds_nothing(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
