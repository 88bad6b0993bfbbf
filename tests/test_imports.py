"""The import rule (STYLE.md habit 1): pure modules load no asyncio, socket, ssl or event loop.

Each pure module is imported in a fresh interpreter, and the test reads what that interpreter then has
in ``sys.modules``: both the forbidden standard modules and the l4proxy modules it pulled in, so the
one-way dependency graph of DESIGN.md is checked too (balancer → health, config → errors).

The subprocess registers a bare ``l4proxy`` package (its ``__path__`` only, ``__init__`` not run) before
importing, which isolates each module's own imports from the package's public surface; the last test
checks that surface too (``__init__`` imports ``Proxy`` lazily).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "uvloop", "subprocess")

PURE_MODULES = {
    # module: the l4proxy modules it may load (itself included)
    "errors": {"errors"},
    "config": {"config", "errors"},
    "health": {"health"},
    "balancer": {"balancer", "config", "errors", "health", "slowstart"},
    "accesslog": {"accesslog"},  # imports relay only for type checking
    "outlier": {"outlier", "errors"},
    "budget": {"budget", "errors"},
    "slowstart": {"slowstart"},
    "acl": {"acl", "errors"},
    "table": {"table", "balancer", "config", "errors", "health", "slowstart"},
    "ownaddrs": {"ownaddrs"},
    "proxyproto": {"proxyproto", "errors"},
    "ratelog": {"ratelog"},
}

_PROBE = """
import importlib, json, sys, types
forbidden = {forbidden!r}
already = [name for name in forbidden if name in sys.modules]
package = types.ModuleType("l4proxy")
package.__path__ = [{package_dir!r}]
sys.modules["l4proxy"] = package
importlib.import_module("l4proxy.{module}")
print(json.dumps({{
    "already": already,
    "forbidden": sorted(name for name in forbidden if name in sys.modules),
    "l4proxy": sorted(name[8:] for name in sys.modules if name.startswith("l4proxy.")),
}}))
"""


def package_dir() -> Path:
    spec = importlib.util.find_spec("l4proxy")  # locates the package without running it
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def loaded_by(module: str) -> dict[str, list[str]]:
    code = _PROBE.format(forbidden=FORBIDDEN, package_dir=str(package_dir()), module=module)
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", sorted(PURE_MODULES))
def test_pure_module_loads_no_io(module: str) -> None:
    loaded = loaded_by(module)
    assert loaded["already"] == [], "the bare interpreter already had them: the check would prove nothing"
    assert loaded["forbidden"] == [], f"l4proxy.{module} pulls in {loaded['forbidden']}"


@pytest.mark.parametrize("module", sorted(PURE_MODULES))
def test_pure_module_depends_only_downward(module: str) -> None:
    assert set(loaded_by(module)["l4proxy"]) == PURE_MODULES[module]


def imported_names(node: ast.AST) -> list[str]:
    """Dotted names an import statement loads, relative ones written without their dots."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        return [base, *(f"{base}.{alias.name}".lstrip(".") for alias in node.names)]
    return []


def test_nothing_imports_the_cli() -> None:
    """DESIGN.md: dependencies point away from cli; only ``__main__`` may import it."""
    importers = [
        path.name
        for path in sorted(package_dir().glob("*.py"))
        if path.name not in ("cli.py", "__main__.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if {"cli", "l4proxy.cli"} & set(imported_names(node))
    ]
    assert importers == []


def test_the_package_itself_loads_the_io_modules_only_when_proxy_is_used() -> None:
    """A plain ``import l4proxy.config`` (package ``__init__`` run) stays pure; ``l4proxy.Proxy`` still works."""
    code = (
        "import sys, l4proxy.config, l4proxy.balancer\n"
        f"loaded = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "from l4proxy import Proxy\n"
        "print(loaded, Proxy.__name__, 'asyncio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[] Proxy True"
