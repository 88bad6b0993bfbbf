"""Error types that say whose fault a failure is.

``ConfigError`` is the user's: the CLI prints it as one line and exits 2. ``UpstreamError`` is a
member's (refused, timed out, TLS failure): the dialer retries elsewhere. ``ClientError`` is a client's:
only that client's session ends.
"""

from __future__ import annotations


class L4ProxyError(Exception):
    """Base of every error l4proxy raises on purpose."""


class ConfigError(L4ProxyError, ValueError):
    """A configuration value is wrong; the message names the field, what arrived and what was expected."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field} {value!r}: {problem}" if value is not None else f"{field}: {problem}")


class UpstreamError(L4ProxyError):
    """A connect attempt to one member failed; ``kind`` is a short machine-friendly cause."""

    def __init__(self, member: str, kind: str, detail: str = "") -> None:
        self.member = member
        self.kind = kind
        self.detail = detail
        super().__init__(f"{member}: {kind}" + (f" ({detail})" if detail else ""))


class NoUpstreamError(L4ProxyError):
    """Every attempt failed or no member was eligible; carries the last cause for the access log."""

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(cause)


class ClientError(L4ProxyError):
    """The client misbehaved (handshake garbage, timeout); only its own session ends."""
