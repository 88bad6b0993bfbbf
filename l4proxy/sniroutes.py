"""SNI routes: which pool serves a TLS client, by the server name its ClientHello asks for.

A route's pattern is an exact name (``a.example``) or ``*.`` and a suffix (``*.b.example``: any name
ending in ``.b.example``, at any depth, but not ``b.example`` itself). An exact name wins over every
suffix, and of the suffixes the longest wins, whatever the order they were written in. Names are
compared in lower case without a trailing dot (``clienthello`` gives them so). A name no route matches,
and a client without SNI, go to the ``default`` pool, or are refused when there is none.

Pure: patterns are checked here (``parse_pattern``, for the config) and looked up in time linear in
the name's labels.
"""

from __future__ import annotations

import re

from .errors import ConfigError

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_pattern(text: object, field_name: str) -> str:
    """``text`` as a route pattern in canonical form (lower case, no trailing dot), or a ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(field_name, text, "expected a server name such as a.example or *.b.example")
    name = text.lower().removesuffix(".")
    wildcard = name.startswith("*.")
    labels = (name[2:] if wildcard else name).split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or len(name) > 253:
        raise ConfigError(field_name, text, "expected a server name such as a.example, or *.b.example for a suffix")
    return name


class Routes:
    """The routes of one listener: ``(pattern, pool)`` pairs with canonical patterns (``parse_pattern``)."""

    __slots__ = ("default", "exact", "suffixes")

    def __init__(self, routes: tuple[tuple[str, str], ...], default: str | None) -> None:
        self.exact = {pattern: pool for pattern, pool in routes if not pattern.startswith("*.")}
        self.suffixes = {pattern[1:]: pool for pattern, pool in routes if pattern.startswith("*.")}  # ".b.example"
        self.default = default

    def pool(self, name: str | None) -> str | None:
        """The pool for server name ``name`` (None: no SNI); None when the client is refused."""
        if name is None:
            return self.default
        found = self.exact.get(name)
        if found is not None:
            return found
        if self.suffixes:
            at = name.find(".")
            while at >= 0:  # from the left: the first suffix found is the longest
                found = self.suffixes.get(name[at:])
                if found is not None:
                    return found
                at = name.find(".", at + 1)
        return self.default
