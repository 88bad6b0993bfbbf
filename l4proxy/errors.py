"""Error types that say whose fault a failure is, and the classification of OS-level failures.

``ConfigError`` is the user's: the CLI prints it as one line and exits 2. ``UpstreamError`` is a
member's (refused, timed out, TLS failure): the dialer retries elsewhere. ``ClientError`` is a client's:
only that client's session ends. :func:`failure_kind` and :func:`out_of_descriptors` turn an exception
from a connect or a probe into a short cause; they recognise socket and ssl errors by class name, so this
module imports neither.
"""

from __future__ import annotations

import errno

# Running out of our own descriptors or memory: no member is to blame, and no other member would fare better.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class L4ProxyError(Exception):
    """Base of every error l4proxy raises on purpose."""


class ConfigError(L4ProxyError, ValueError):
    """A configuration value is wrong; the message names where, what arrived and what was expected.

    ``path`` is where the value sits in the configuration tree, dotted from the root
    (``pools.default.health.interval``, ``listeners[0].tls.cert``) or relative to the object that
    raised it (``interval``) until :meth:`under` places it; the CLI maps paths to its flags.
    """

    def __init__(self, path: str, value: object, problem: str) -> None:
        self.path = path
        self.value = value
        self.problem = problem
        super().__init__(f"{path} {value!r}: {problem}" if value is not None else f"{path}: {problem}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` (a parent's path) in front of its path."""
        joined = prefix if not self.path else f"{prefix}{'' if self.path.startswith('[') else '.'}{self.path}"
        return ConfigError(joined, self.value, self.problem)


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
    """The client misbehaved (handshake garbage, timeout); only its own session ends. ``reason`` is a
    short cause for counting (one of its parser's ``REASONS``), ``message`` one line for the log."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(message)


def out_of_descriptors(exc: BaseException) -> bool:
    """The proxy itself ran out of descriptors or memory: says nothing about the member."""
    return isinstance(exc, OSError) and exc.errno in EXHAUSTION_ERRNOS


def failure_kind(exc: BaseException) -> str:
    """A short cause for logs and metrics: refused, timeout, dns, tls: ..., or the OS error."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return "timeout"
    classes = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}
    if "socket.gaierror" in classes:
        return f"dns: {getattr(exc, 'strerror', exc)}"
    if "ssl.SSLCertVerificationError" in classes:
        return f"tls: {getattr(exc, 'verify_message', None) or getattr(exc, 'reason', None)}"
    if "ssl.SSLError" in classes:
        return f"tls: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
