"""The TOML config file: its schema, its problems with line numbers, and the effective configuration.

The schema is not written by hand: :data:`SCHEMA` walks the config dataclasses, so every setting a
flag can reach is a key of the file at the same path, with listeners and pools as tables by name
(``listeners.redis.tls.cert``, ``pools.cache.health.interval``; process-level settings at the top).
A value may be written as TOML (``idle_timeout = 30``, ``buffer_size = 65536``) or as text in the form
its flag takes (``"1h"``, ``"64k"``, ``"auto"``): the text parsers are the flags', handed in by the
CLI as ``forms`` (by schema path), so each field has one parser for both.

tomllib reports no positions, so :func:`locate` maps every dotted path of a valid document to the line
that defines it, and every problem is ``FILE:LINE: dotted.path: what is wrong``. Independent problems
are all reported: each key is checked on its own, and what ``config.from_tree`` refuses is dropped
and the rest built again until it builds or nothing is left to drop.

Pure: no sockets, no event loop. Whether a certificate file exists is asked of the ``exists``
callable the caller passes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os.path
import re
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .config import (
    SRV_PREFIX,
    SYSLOG,
    Address,
    Config,
    ListenerConfig,
    MemberConfig,
    PoolConfig,
    Service,
    from_tree,
    parse_address,
    parse_target,
)
from .errors import ConfigError, L4ProxyError

Form = Callable[[str, str], Any]  # the text as typed and its path -> the value (a flag's parser)
Exists = Callable[[str], bool]  # whether a file is there


def _any_file(_path: str) -> bool:
    return True


# --- the schema ------------------------------------------------------------------------------------

NAMED = {"listeners": ListenerConfig, "pools": PoolConfig}  # top-level tables of sections by name
_HIDDEN = {(ListenerConfig, "name"), (PoolConfig, "name"), (ListenerConfig, "reuse_port"), (Config, "listeners"),
           (Config, "pools")}  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Key:
    """One key of the file. ``path`` has ``*`` for a listener's or pool's name; ``kind`` is the value's
    type (``float`` is a duration), ``"address"``, ``"members"``, ``"names"`` (a list of text), ``"paths"``
    (a file path, or a list of them), ``"routes"`` (a table of text by name: SNI routes),
    ``"section"`` (a table) or ``"named"`` (a table of sections by name)."""

    path: str
    kind: type | str
    default: Any = MISSING  # MISSING: required; None: not set unless given
    section: type | None = None

    @property
    def leaf(self) -> bool:
        return self.kind not in ("section", "named")


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``."""
    args = typing.get_args(hint)
    return next(a for a in args if a is not type(None)) if type(None) in args else hint


def _kind(hint: Any) -> type | str:
    if hint is Address:
        return "address"
    if hint == tuple[str, ...] | str:
        return "paths"
    if hint == tuple[tuple[str, str], ...]:
        return "routes"
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return "members" if item is MemberConfig else "names"
    if dataclasses.is_dataclass(hint):
        return "section"
    return typing.cast(type, hint)


def _walk(kind: type, prefix: str) -> Iterator[Key]:
    hints = typing.get_type_hints(kind)
    for spec in fields(kind):
        if (kind, spec.name) in _HIDDEN:
            continue
        path = f"{prefix}.{spec.name}" if prefix else spec.name
        hint = _without_none(hints[spec.name])
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        key_kind = _kind(hint)
        yield Key(path, key_kind, default, hint if key_kind == "section" else None)
        if key_kind == "section":
            yield from _walk(hint, path)
    if kind is Config:
        for name, section in NAMED.items():
            yield Key(name, "named", None, section)
            yield Key(f"{name}.*", "section", None, section)
            yield from _walk(section, f"{name}.*")


def _children(paths: Iterator[str]) -> dict[str, list[str]]:
    """The keys under each table path, in declaration order (for "did you mean" and the printout)."""
    children: dict[str, list[str]] = {}
    for path in paths:
        parent, _, child = path.rpartition(".")
        children.setdefault(parent, []).append(child)
    return children


SCHEMA: dict[str, Key] = {key.path: key for key in _walk(Config, "")}
_MEMBER_KEYS = tuple(f.name for f in fields(MemberConfig))  # a member table's keys
_CHILDREN = _children(iter(SCHEMA))


def generic(path: str) -> str:
    """The schema path of a concrete path: ``listeners.redis.tls.cert`` and the flags' ``listeners[0].tls.cert``
    are both ``listeners.*.tls.cert``; ``pools.default.members[2]`` is ``pools.*.members``."""
    path = re.sub(r"^(listeners|pools)(\[\d+\]|\.[^.\[]+)", r"\1.*", path)
    return re.sub(r"\[\d+\]$", "", path)


# --- problems --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the file, where it is."""

    line: int
    path: str
    message: str

    def render(self, filename: str) -> str:
        return f"{filename}:{self.line}: {self.path}: {self.message}"


class ConfigFileError(L4ProxyError):
    """The file has problems; ``lines()`` gives one ``FILE:LINE: path: message`` line for each."""

    def __init__(self, problems: list[Problem], filename: str = "config") -> None:
        self.problems = problems
        self.filename = filename
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [problem.render(self.filename) for problem in self.problems]


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list) and all(isinstance(v, Address) for v in value):
        return repr([str(v) for v in value])
    return repr(str(value) if isinstance(value, Address) else value)


def describe(exc: ConfigError) -> str:
    """The problem of ``exc`` with the value it was about, as the file line says it."""
    return exc.problem if exc.value is None else f"{exc.problem} (got {_shown(exc.value)})"


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- the document ----------------------------------------------------------------------------------

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")  # a path's steps: a key, or an index into a list
_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


class Document:
    """A parsed file: its data and the line of every path in it."""

    def __init__(self, data: dict[str, Any], lines: dict[str, int]) -> None:
        self.data = data
        self.lines = lines

    @classmethod
    def parse(cls, source: bytes) -> Document:
        """The document in ``source``; ConfigFileError for bytes that are not UTF-8 TOML."""
        try:
            text = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = source[: exc.start].count(b"\n") + 1
            problem = Problem(line, "syntax", f"not UTF-8 text (byte {source[exc.start]:#04x})")
            raise ConfigFileError([problem]) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            found = _AT.search(message)
            line = text.count("\n") + 1 if found is None or found.group(1) is None else int(found.group(1))
            where = f" at column {found.group(2)}" if found is not None and found.group(2) else ""
            what = message[: found.start()] if found else message
            raise ConfigFileError([Problem(line, "syntax", f"{what}{where}")]) from None
        return cls(data, locate(text))

    def line(self, path: str) -> int:
        """The line that defines ``path`` or, when it is not in the file, its closest enclosing table."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"[.\[]", path) else ""
        return 1

    def problem(self, exc: ConfigError) -> Problem:
        return Problem(self.line(exc.path), exc.path, describe(self._as_typed(exc)))

    def _as_typed(self, exc: ConfigError) -> ConfigError:
        """``exc`` with the value as the file has it (``0``, not the ``0.0`` it became) when the file
        holds one plain value at its path and the error is about all of it, not a part (one name of a
        list, one member option)."""
        typed: Any = self.data
        for name, index in _STEP.findall(exc.path):
            if name and isinstance(typed, dict) and name in typed:
                typed = typed[name]
            elif index and isinstance(typed, list) and int(index) < len(typed):
                typed = typed[int(index)]
            else:  # not in the file as such (a default, or a name with dots)
                return exc
        part = isinstance(exc.value, str) and exc.value != str(typed)
        if exc.value is None or isinstance(typed, dict | list) or part:
            return exc
        return ConfigError(exc.path, typed, exc.problem)

    def build(self, forms: Mapping[str, Form], base: str = "", exists: Exists = _any_file) -> Config:
        """The Config the file describes. Relative file paths are taken from ``base`` (the file's folder);
        ConfigFileError lists every problem found."""
        problems: list[ConfigError] = []
        converter = _Converter(forms, base, problems)
        tree = converter.table(self.data, "", "")
        _cross_check(tree, problems, exists, converter.positions)
        config = _build(tree, problems)
        if problems or config is None:
            raise ConfigFileError(sorted(map(self.problem, problems), key=lambda p: p.line))
        return config


def load(source: bytes, forms: Mapping[str, Form], base: str = "", exists: Exists = _any_file) -> Config:
    """The Config in a file's bytes, or ConfigFileError with every problem."""
    return Document.parse(source).build(forms, base, exists)


# --- plain data to the tree from_tree takes --------------------------------------------------------


class _Converter:
    """Checks each key against the schema and turns its value into what the dataclasses take; a bad
    key or value is a problem and is left out, so the rest is still checked."""

    def __init__(self, forms: Mapping[str, Form], base: str, problems: list[ConfigError]) -> None:
        self.forms = forms
        self.base = base
        self.problems = problems
        self.positions: dict[str, list[int]] = {}  # a members list's path -> each kept member's index

    def table(self, data: Mapping[str, Any], schema: str, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in data.items():
            where = f"{path}.{name}" if path else name
            try:
                key = self._key(schema, name, where)
                out[name] = self.value(key, value, where)
            except ConfigError as exc:
                self.problems.append(exc)
        return out

    def _key(self, schema: str, name: str, where: str) -> Key:
        if SCHEMA.get(schema) is not None and SCHEMA[schema].kind == "named":
            if not _NAME.fullmatch(name):
                raise ConfigError(where, None, "a name is letters, digits, '-' and '_'")
            return SCHEMA[f"{schema}.*"]
        key = SCHEMA.get(f"{schema}.{name}" if schema else name)
        if key is None:
            raise ConfigError(where, None, "no such setting" + _suggest(name, _CHILDREN.get(schema, [])))
        return key

    def value(self, key: Key, value: Any, where: str) -> Any:
        if not key.leaf:
            if not isinstance(value, dict):
                shape = f"[{key.path.split('.')[0]}.NAME]" if key.kind == "named" else f"[{where}]"
                raise ConfigError(where, value, f"expected a table, as {shape}")
            return self.table(value, key.path, where)
        if key.kind == "members":
            if not isinstance(value, list):
                raise ConfigError(where, value, 'expected a list of members, as ["HOST:PORT", ...]')
            members = []
            positions = self.positions[where] = []
            for index, item in enumerate(value):
                try:
                    members.append(self._member(item, f"{where}[{index}]"))
                    positions.append(index)
                except ConfigError as exc:  # the others are still checked (a member listed twice)
                    self.problems.append(exc)
            return members
        return self._leaf(key, value, where)

    def _member(self, item: Any, where: str) -> MemberConfig:
        """A member: ``"HOST:PORT"`` or ``"srv:NAME"``, or a table of ``address`` (that text) and the
        member's options (``{address = "HOST:PORT", weight = 3, max_conns = 10, backup = true}``)."""
        if isinstance(item, str):
            return MemberConfig(self._target(item, where))
        if not isinstance(item, dict):
            raise ConfigError(where, item, 'expected "HOST:PORT" text or a table with an address')
        options: dict[str, Any] = {}
        for name, value in item.items():
            at = f"{where}.{name}"
            if name == "address":
                if not isinstance(value, str):
                    raise ConfigError(at, value, 'expected "HOST:PORT" or "srv:NAME" text')
                options[name] = self._target(value, at)
            elif name in ("weight", "max_conns") and type(value) is not int:
                raise ConfigError(at, value, "expected a whole number")
            elif name == "backup" and type(value) is not bool:
                raise ConfigError(at, value, "expected true or false")
            elif name in _MEMBER_KEYS:
                options[name] = value
            else:
                raise ConfigError(at, None, "no such member setting" + _suggest(name, list(_MEMBER_KEYS)))
        if "address" not in options:
            raise ConfigError(f"{where}.address", None, 'required: "HOST:PORT" or "srv:NAME"')
        try:
            return MemberConfig(**options)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc.path}", exc.value, exc.problem) from None

    @staticmethod
    def _target(text: str, where: str) -> Address | Service:
        if text.lower().startswith(SRV_PREFIX):
            return parse_target(text, where, default_port=0)  # the SRV records give the ports
        return parse_address(text, where)

    def _leaf(self, key: Key, value: Any, where: str) -> Any:
        form = self.forms.get(key.path)
        if isinstance(value, str) and form is not None and key.kind is not str:
            value = form(value, where)
        elif key.kind is str and isinstance(value, str):
            value = form(value, where) if form is not None else value
            if key.path in PATHS and value not in ("-", "off") and not value.startswith(SYSLOG):
                value = os.path.normpath(os.path.join(self.base, value))
        elif key.kind == "names" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        elif key.kind == "paths" and _paths(value):
            texts = [value] if isinstance(value, str) else value
            value = tuple(os.path.normpath(os.path.join(self.base, text)) for text in texts)
        elif key.kind == "address" and isinstance(value, str):
            value = parse_address(value, where)
        elif key.kind == "routes" and isinstance(value, dict):
            pass  # each pattern and pool is checked by ListenerConfig and _cross_check, each on its own line
        elif key.kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(where, value, "expected a finite number of seconds")
            value = float(value)
        elif key.kind is int and type(value) is int and form is not None:
            value = form(str(value), where)  # the flag's bounds hold in the file too (workers: 1..256)
        elif key.kind in (int, bool) and type(value) is key.kind:
            pass
        else:
            raise ConfigError(where, value, f"expected {_EXPECTED[key.kind]}")
        return value


def _paths(value: Any) -> bool:
    """Whether ``value`` is a file path or a non-empty list of them."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


_EXPECTED: dict[type | str, str] = {
    float: 'a duration, as 30 (seconds) or "250ms", "5s", "1m", "1h"',
    int: "a whole number",
    bool: "true or false",
    str: "text",
    bytes: r'text with escapes, as "PING\r\n"',
    "names": 'a list of names, as ["h2", "http/1.1"]',
    "paths": 'a file path, or a list of them, as "server.pem" or ["a.pem", "b.pem"]',
    "address": 'an address, as "HOST:PORT"',
    "routes": 'a table of server names and pools, as { "a.example" = "pool_a", "*.b.example" = "pool_b" }',
}
# Keys whose text is a file path: a relative one is taken from the config file's folder.
PATHS = frozenset(
    {"access_log", *(f"listeners.*.tls.{k}" for k in ("cert", "key", "client_ca")),
     *(f"pools.*.tls.{k}" for k in ("ca", "cert", "key"))}
)  # fmt: skip
_MUST_EXIST = PATHS - {"access_log"}


def _cross_check(
    tree: dict[str, Any], problems: list[ConfigError], exists: Exists, positions: Mapping[str, list[int]]
) -> None:
    """What no single key shows: a listener's pool that does not exist, one listen address given twice,
    a member listed twice, a certificate file that is not there. A listener naming no pool is dropped."""
    pools = list(tree.get("pools", {}))
    listeners = tree.get("listeners", {})
    bound: list[tuple[Address, str]] = []
    for name, listener in list(listeners.items()):
        pool = listener.get("pool", "default")
        if pool not in pools:
            hint = _suggest(pool, pools) or (f"; known: {', '.join(pools)}" if pools else "; no pools are defined")
            problems.append(ConfigError(f"listeners.{name}.pool", pool, "no such pool" + hint))
            del listeners[name]
        _check_routes(name, listener, pools, problems)
        address = listener.get("address")
        if isinstance(address, Address):
            for other, other_name in bound:
                if _overlap(other, address):
                    problems.append(
                        ConfigError(
                            f"listeners.{name}.address",
                            str(address),
                            f"overlaps listeners.{other_name}.address {str(other)!r}",
                        )
                    )
                    break
            bound.append((address, name))
    for name, pool in tree.get("pools", {}).items():
        first: dict[Address | Service, int] = {}
        members = pool.get("members", [])
        indices = positions.get(f"pools.{name}.members", range(len(members)))
        for index, member in zip(indices, (m.address for m in members), strict=True):
            if member in first:
                problems.append(
                    ConfigError(
                        f"pools.{name}.members[{index}]", str(member), f"listed twice (also members[{first[member]}])"
                    )
                )
            first.setdefault(member, index)
    _check_files(tree, "", problems, exists)


def _check_routes(name: str, listener: dict[str, Any], pools: list[str], problems: list[ConfigError]) -> None:
    """An SNI route to a pool that does not exist is a problem of its own line; the route is dropped."""
    routes = listener.get("sni")
    if not isinstance(routes, dict):
        return
    for pattern, pool in list(routes.items()):
        if isinstance(pool, str) and pool not in pools:
            hint = _suggest(pool, pools) or (f"; known: {', '.join(pools)}" if pools else "; no pools are defined")
            problems.append(ConfigError(f"listeners.{name}.sni.{pattern}", pool, "no such pool" + hint))
            del routes[pattern]


def _overlap(a: Address, b: Address) -> bool:
    """Two listen addresses that cannot both be bound: the same, or the same port on a wildcard."""
    return a.port == b.port and (a.host == b.host or a.host in ("", "0.0.0.0", "::") or b.host in ("", "0.0.0.0", "::"))


def _check_files(node: Mapping[str, Any], path: str, problems: list[ConfigError], exists: Exists) -> None:
    for name, value in node.items():
        where = f"{path}.{name}" if path else name
        if isinstance(value, dict):
            _check_files(value, where, problems, exists)
        elif generic(where) in _MUST_EXIST and isinstance(value, str) and not exists(value):
            problems.append(ConfigError(where, value, "no such file"))
        elif generic(where) in _MUST_EXIST and isinstance(value, tuple):
            for index, item in enumerate(value):
                if not exists(item):
                    problems.append(ConfigError(f"{where}[{index}]" if len(value) > 1 else where, item, "no such file"))


def _build(tree: dict[str, Any], problems: list[ConfigError]) -> Config | None:
    """``from_tree(tree)``; each refusal is recorded and its value dropped, until it builds or nothing is
    left to drop. A refusal is not recorded again for a path already reported or dropped, or for one that
    encloses it; a listener whose pool was refused goes with its pool, and is not another problem, nor is
    ``sni_strict`` once every route was refused."""
    dropped: list[str] = []
    while True:
        try:
            return from_tree(tree)
        except ConfigError as exc:
            exc = _by_name(tree, exc)
            known = [*(p.path for p in problems), *dropped]
            path = exc.path
            if path.endswith(".pool") and any(_related(f"pools.{exc.value}", other) for other in known):
                path = path.removesuffix(".pool")
            elif path.endswith(".sni_strict") and any(o.startswith(f"{path[:-7]}.") for o in known):
                pass  # its routes were all refused: not another problem
            elif not any(_related(path, other) for other in known):
                problems.append(exc)
            dropped.append(path)
            if not _drop(tree, path):
                return None


def _by_name(tree: Mapping[str, Any], exc: ConfigError) -> ConfigError:
    """``exc`` with ``listeners[i]`` (a Config names listeners by index) as the file names it."""
    found = re.match(r"listeners\[(\d+)\]", exc.path)
    names = list(tree.get("listeners", {}))
    if found is None or int(found.group(1)) >= len(names):
        return exc
    return ConfigError(f"listeners.{names[int(found.group(1))]}{exc.path[found.end() :]}", exc.value, exc.problem)


def _related(path: str, other: str) -> bool:
    return any(a == b or a.startswith((b + ".", b + "[")) for a, b in ((path, other), (other, path)))


def _drop(tree: dict[str, Any], path: str) -> bool:
    """Remove the deepest value along ``path`` that is in ``tree``; False when there is none."""
    parts: list[str | int] = [int(i) if i else k for k, i in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]
    node: Any = tree
    parent: Any = None
    key: str | int | None = None
    for at, part in enumerate(parts):
        rest = ".".join(str(p) for p in parts[at:])
        if isinstance(node, dict) and rest in node:  # a key with dots in it (an SNI route's name)
            parent, key = node, rest
            break
        in_table = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_table or in_list):
            break
        parent, key, node = node, part, node[part]
    if parent is None or key is None:
        return False
    del parent[key]
    return True


# --- the effective configuration as TOML -----------------------------------------------------------


def duration_text(seconds: float) -> str | float:
    """``"1h"``, ``"30s"``, ``"250ms"`` (``"0s"`` for none) when that reads back as exactly ``seconds``;
    else the number."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        count = seconds / size
        if count >= 1 and count.is_integer() and float(int(count)) * size == seconds:
            return f"{int(count)}{unit}"
    millis = round(seconds * 1000)
    if millis >= 1 and float(millis) * 0.001 == seconds:
        return f"{millis}ms"
    return seconds


_BYTE_ESCAPES = {0x0D: r"\r", 0x0A: r"\n", 0x09: r"\t", 0x00: r"\0", 0x5C: "\\\\"}


def escapes_text(data: bytes) -> str:
    r"""``data`` in the escape syntax of ``--health-send`` (``PING\r\n``): reads back as the same bytes."""
    return "".join(_BYTE_ESCAPES.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}") for b in data)


def toml_value(value: Any) -> str:
    """A TOML value: text, numbers, booleans, lists, and tables written inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_key(key: str) -> str:
    return key if _NAME.fullmatch(key) else toml_value(key)


def file_value(key: Key, value: Any) -> Any:
    """A Config value as the file writes it (durations and probe bytes as text)."""
    if key.kind is float:
        return duration_text(value)
    if key.kind is bytes:
        return escapes_text(value)
    if key.kind == "address":
        return str(value)
    if key.kind == "members":
        return [_member_value(member) for member in value]
    if key.kind == "paths":
        return value[0] if len(value) == 1 else list(value)
    if key.kind == "routes":
        return dict(value)
    return value


def _member_value(member: MemberConfig) -> str | dict[str, Any]:
    """A member as the file writes it: its address as text, or a table when it has options."""
    options = {
        f.name: getattr(member, f.name)
        for f in dataclasses.fields(member)
        if f.name != "address" and getattr(member, f.name) != f.default
    }
    return {"address": str(member.address), **options} if options else str(member.address)


def dump(config: Config) -> str:
    """The effective configuration as a config file: every key with its value, defaults included (a key
    that is not set is a comment); reading it back gives the same Config."""
    out = ["# every setting, defaults filled in (l4proxy check)"]
    _dump_section(config, "", "", out)
    for table, items in (("listeners", config.listeners), ("pools", config.pools)):
        for item in items:
            out.append(f"\n[{table}.{item.name}]")
            _dump_section(item, f"{table}.*", f"{table}.{item.name}", out)
    return "\n".join(out) + "\n"


def _dump_section(obj: Any, schema: str, path: str, out: list[str]) -> None:
    later: list[tuple[Key, Any, str]] = []
    for child in _CHILDREN.get(schema, []):
        key = SCHEMA[f"{schema}.{child}" if schema else child]
        if key.kind == "named":
            continue
        value = getattr(obj, child)
        if key.kind == "section":
            later.append((key, value, f"{path}.{child}"))
        elif value is None:
            out.append(f"# {child} is not set")
        else:
            out.append(f"{child} = {toml_value(file_value(key, value))}")
    for key, value, where in later:
        if value is None:
            out.append(f"# [{where}] is not set")
        else:
            out.append(f"\n[{where}]")
            _dump_section(value, key.path, where, out)


# --- where each path is defined --------------------------------------------------------------------


def locate(text: str) -> dict[str, int]:
    """The line (from 1) of every dotted path a valid TOML document defines: tables (``[a.b]``, and
    the tables they imply), arrays of tables (``[[a]]`` is ``a[0]``, then ``a[1]``), keys (dotted ones
    too), the items of arrays (``a[2]``) and the keys of inline tables. The first definition wins, except
    that a table's own header wins over the headers that implied it."""
    return _Locator(text).run()


class _Locator:
    """A scanner over a document tomllib has accepted, so it need not reject anything."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[str, int] = {}
        self.explicit: set[str] = set()
        self.arrays: dict[str, int] = {}  # array-of-tables path -> elements so far

    def run(self) -> dict[str, int]:
        table = ""
        while self._skip(newlines=True) is not None:
            if self.text.startswith("[", self.pos):
                table = self._header()
            else:
                path = self._dotted(table)
                self._expect("=")
                self._value(path)
        return self.lines

    # characters

    def _peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def _advance(self, count: int = 1) -> None:
        self.line += self.text.count("\n", self.pos, self.pos + count)
        self.pos += count

    def _skip(self, newlines: bool) -> str | None:
        """Skip blanks, comments and (with ``newlines``) line ends; the next character, None at the end."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "#":
                end = self.text.find("\n", self.pos)
                self._advance((len(self.text) if end < 0 else end) - self.pos)
            elif char in " \t" or (newlines and char in "\r\n"):
                self._advance()
            else:
                return char
        return None

    def _expect(self, char: str) -> None:
        self._skip(newlines=False)
        self._advance(len(char))

    # keys and tables

    def _record(self, path: str, explicit: bool = False) -> None:
        if path not in self.lines or (explicit and path not in self.explicit):
            self.lines[path] = self.line
        if explicit:
            self.explicit.add(path)

    def _keys(self) -> list[str]:
        keys = []
        while True:
            self._skip(newlines=False)
            char = self._peek()
            if char in ('"', "'"):
                start = self.pos
                self._string()
                keys.append(tomllib.loads(f"k = {self.text[start : self.pos]}")["k"])
            else:
                match = re.compile(r"[A-Za-z0-9_-]+").match(self.text, self.pos)
                end = match.end() if match else self.pos + 1
                keys.append(self.text[self.pos : end])
                self._advance(end - self.pos)
            self._skip(newlines=False)
            if self._peek() != ".":
                return keys
            self._advance()

    def _dotted(self, table: str) -> str:
        path = table
        for key in self._keys():
            path = f"{path}.{key}" if path else key
            self._record(path)
        return path

    def _header(self) -> str:
        array = self.text.startswith("[[", self.pos)
        self._advance(2 if array else 1)
        keys = self._keys()
        path = ""
        for index, key in enumerate(keys):
            path = f"{path}.{key}" if path else key
            last = index == len(keys) - 1
            if last and array:
                count = self.arrays.get(path, 0)
                self.arrays[path] = count + 1
                self._record(path)
                path = f"{path}[{count}]"
            elif path in self.arrays:
                path = f"{path}[{self.arrays[path] - 1}]"
            self._record(path, explicit=last)
        self._expect("]]" if array else "]")
        return path

    # values

    def _value(self, path: str) -> None:
        self._skip(newlines=False)
        char = self._peek()
        if char in ('"', "'"):
            self._string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            match = re.compile(r"[^,\]}#\r\n]*").match(self.text, self.pos)
            self._advance((match.end() if match else self.pos) - self.pos)

    def _string(self) -> None:
        quote = self.text[self.pos]
        if self.text.startswith(quote * 3, self.pos):
            self._advance(3)
            while not self.text.startswith(quote * 3, self.pos):
                self._advance(2 if quote == '"' and self._peek() == "\\" else 1)
            run = len(self.text[self.pos :]) - len(self.text[self.pos :].lstrip(quote))
            self._advance(min(run, 5))
            return
        self._advance()
        while self._peek() != quote:
            self._advance(2 if quote == '"' and self._peek() == "\\" else 1)
        self._advance()

    def _array(self, path: str) -> None:
        self._advance()
        index = 0
        while self._skip(newlines=True) != "]":
            item = f"{path}[{index}]"
            self._record(item)
            self._value(item)
            if self._skip(newlines=True) == ",":
                self._advance()
            index += 1
        self._advance()

    def _inline_table(self, path: str) -> None:
        self._advance()
        while self._skip(newlines=True) != "}":
            if self._peek() == ",":
                self._advance()
                continue
            key = self._dotted(path)
            self._expect("=")
            self._value(key)
        self._advance()
