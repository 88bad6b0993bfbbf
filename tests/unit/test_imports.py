"""The import rule (STYLE.md habit 1): pure modules load no asyncio, socket, ssl or event loop.

Each pure module is imported in a fresh interpreter, and the test reads what that interpreter then has
in ``sys.modules``: both the forbidden standard modules and the l4proxy modules it pulled in, so the
one-way dependency graph is checked too (balancer → health, config → errors).

The whole package's graph is checked statically as well: every ``import`` in every module (those under
``TYPE_CHECKING`` and inside functions included) must be an edge declared in ``ALLOWED``, and the
declared graph has no cycle. Its shape: ``cli → workers/proxy → frontend → sessions/dialer/prober/pool →
splice → relay → pure modules``; the relay owns the seams it calls (``Engine``, ``Dialing``,
``Wiring``), so nothing it calls has to import it back.

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
    "config": {"config", "outlier", "acl", "checks", "errors", "sniroutes"},
    "checks": {"checks", "errors"},
    "resp": {"resp", "checks", "errors"},
    "pgwire": {"pgwire", "checks", "errors"},
    "httpcheck": {"httpcheck", "checks", "errors"},
    "configfile": {"configfile", "outlier", "acl", "config", "checks", "errors", "sniroutes"},
    "health": {"health"},
    "balancer": {"balancer", "outlier", "acl", "checks", "config", "counters", "errors", "health", "histogram"}
    | {"slowstart", "sniroutes"},
    "counters": {"counters", "histogram"},
    "histogram": {"histogram"},
    "accesslog": {"accesslog", "peer"},  # reads sessions through its own Protocol
    "peer": {"peer"},
    "causes": {"causes"},
    "outlier": {"outlier", "errors"},
    "budget": {"budget", "errors"},
    "slowstart": {"slowstart"},
    "acl": {"acl", "errors"},
    "table": {"table", "acl", "balancer", "checks", "config", "counters", "discovery", "errors", "health"}
    | {"histogram", "outlier", "slowstart", "sniroutes"},
    "discovery": {"discovery", "outlier", "acl", "checks", "config", "errors", "sniroutes"},
    "ownaddrs": {"ownaddrs"},
    "proxyproto": {"proxyproto", "errors"},
    "clienthello": {"clienthello", "errors"},
    "sniroutes": {"sniroutes", "errors"},
    "ratelog": {"ratelog"},
    "reload": {"reload", "outlier", "acl", "config", "checks", "errors", "sniroutes"},
    "spread": {"spread"},
    "certrules": {"certrules"},
    "topview": {"topview"},
    "boundaries": {"boundaries"},
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


# module: the l4proxy modules it may import (any kind of import). A new edge is a design decision:
# add it here only if it points down (the test below refuses cycles).
ALLOWED: dict[str, set[str]] = {
    "__main__": {"cli"},
    "__init__": {"config", "errors", "proxy"},
    "cli": {"accesslog", "acl", "checks", "config", "configfile", "discovery", "errors", "ownaddrs", "proxy", "tls"}
    | {"notify", "reload", "takeover", "workers", "admin", "snapshot", "top", "syslogsink"},
    "top": {"config", "errors", "topview"},
    "demo": {"config", "proxy"},
    "workers": {"accesslog", "balancer", "checks", "config", "configfile", "discovery", "errors", "health"}
    | {"listener"}
    | {"notify", "pool", "prober", "proxy", "reload", "resolver", "table", "tls", "admin", "sharedstats"}
    | {"snapshot", "syslogsink"},
    "proxy": {"accesslog", "balancer", "causes", "config", "counters", "deadlines", "dialer", "errors", "frontend"}
    | {"listener"}
    | {"pool", "prober", "ratelog", "relay", "reload", "resolver", "safeclose", "sessions", "splice", "syslogsink"}
    | {"tls"},
    "safeclose": {"boundaries", "relay", "splice"},
    "frontend": {"accesslog", "causes", "config", "counters", "deadlines", "dialer", "drive", "edge", "listener"}
    | {"peer", "pool", "ratelog", "relay", "sessions", "sni", "splice", "tls", "tlsengine"},
    "edge": {"acl", "awaiting", "config", "deadlines", "listener", "peer", "proxyproto", "ratelog"},
    "awaiting": {"deadlines", "listener", "peer", "ratelog"},
    "sni": {"awaiting", "clienthello", "config", "deadlines", "listener", "peer", "pool", "ratelog", "sniroutes"},
    "sessions": {"causes", "counters", "drive", "listener", "relay", "spread", "tlsengine"},
    "dialer": {"balancer", "budget", "config", "deadlines", "drive", "errors", "health", "peer", "pool"}
    | {"proxyproto", "ratelog", "relay", "tls", "tlsengine"},
    "prober": {"balancer", "checks", "counters", "dialer", "errors", "health", "httpcheck", "pgwire", "pool"}
    | {"proxyproto", "resp", "tls"},
    "pool": {"balancer", "budget", "config", "discovery", "health", "counters", "outlier"},
    # monitoring, beside the data path: only the adapter (snapshot) and the workers' copy read the objects
    "admin": {"config", "counters", "metrics", "snapshot"},
    "metrics": {"counters", "histogram", "snapshot"},
    "snapshot": {"balancer", "checks", "config", "counters", "edge", "listener", "pool", "prober", "proxy"}
    | {"frontend", "histogram", "relay"},
    "sharedstats": {"balancer", "config", "counters", "edge", "pool", "prober", "proxy", "snapshot", "table"}
    | {"histogram"},
    "splice": {"causes", "config", "relay"},
    "relay": {"balancer", "causes", "config", "peer", "tls"},
    "listener": {"config", "errors"},
    "tls": {"certrules", "config", "errors"},
    "resolver": {"balancer", "config", "discovery", "errors", "pool"},
    "syslogsink": {"accesslog", "config"},  # the access log's one sink with sockets
    "drive": set(),
    "tlsengine": set(),
    "takeover": set(),
    "notify": set(),
    "deadlines": set(),
    **{module: loads - {module} for module, loads in PURE_MODULES.items()},
}


def static_imports() -> dict[str, set[str]]:
    """Every package module and the package modules its source imports, however and wherever."""
    modules = {path.stem for path in package_dir().glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(package_dir().glob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("l4proxy")):
                parts = (node.module or "").split(".")
                name = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
                found |= {name} if name else {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("l4proxy.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_every_module_has_its_place_in_the_graph() -> None:
    assert sorted(set(static_imports()) - set(ALLOWED)) == [], "add the new module's edges to ALLOWED"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_follow_the_declared_edges(module: str) -> None:
    extra = static_imports().get(module, set()) - ALLOWED[module]
    assert extra == set(), f"l4proxy.{module} imports {sorted(extra)}, which ALLOWED does not declare"


def test_the_declared_graph_has_no_cycle() -> None:
    """Peel off modules with no remaining dependencies; whatever cannot be peeled is on a cycle."""
    left = {module: set(deps) for module, deps in ALLOWED.items()}
    while True:
        leaves = {module for module, deps in left.items() if not deps & left.keys()}
        if not leaves:
            break
        for module in leaves:
            del left[module]
    assert left == {}, f"a cycle among {sorted(left)}"


@pytest.mark.parametrize(("upper", "lower"), [("relay", "dialer"), ("relay", "splice"), ("relay", "accesslog")])
def test_the_relay_imports_none_of_the_modules_that_call_it(upper: str, lower: str) -> None:
    """The cycle this graph replaced: the relay called its engine, dial and log by importing them."""
    assert lower not in static_imports()[upper]
