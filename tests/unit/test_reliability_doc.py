"""``docs/reliability.md`` stays true: every case from 1 to 41 is listed once, each names a covering
test or says which feature it waits for, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "reliability.md").read_text()


def cases() -> dict[int, str]:
    found: dict[int, str] = {}
    for match in re.finditer(r"^(\d+)\. (.*?)(?=^\d+\. |^## |\Z)", DOC, re.S | re.M):
        number = int(match.group(1))
        assert number not in found, f"case {number} is listed twice"
        found[number] = match.group(2)
    return found


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def test_every_case_is_listed_once_with_a_test_or_a_missing_feature() -> None:
    listed = cases()
    assert sorted(listed) == list(range(1, 42))
    for number, text in listed.items():
        assert "::test_" in text or "not yet:" in text, f"case {number} names no test and no missing feature"


def test_every_named_test_exists() -> None:
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", DOC))
    assert len(named) > 60
    files = {path.name: path for path in (ROOT / "tests").glob("*/test_*.py")}
    missing = [f"{file}::{name}" for file, name in sorted(named) if name not in defined_tests(files[file])]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
