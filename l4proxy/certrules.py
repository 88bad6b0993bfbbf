"""Which of a listener's certificates a server name selects, and whether a certificate's dates allow it.

Rules, as HAProxy's crt-list applies them:

* A certificate serves the DNS names of its subjectAltName. ``*.example.com`` covers exactly one
  label (``a.example.com``, not ``example.com`` nor ``a.b.example.com``, as RFC 6125 section 6.4.3);
  any other use of ``*`` is not a wildcard this module understands, and is never matched.
* An exact name beats a wildcard, whatever the order; between equals, the certificate listed first
  wins. A name that matches nothing (or no SNI at all) gets the first certificate, the default.
* Names compare without case and without a trailing dot (DNS names are case-insensitive; SNI carries
  A-labels, so internationalised names compare as their ``xn--`` form).
* A certificate outside its validity period is refused; one that ends within ``WARN_BEFORE`` is worth
  a warning, so it is renewed before clients start failing.

Plain data in and out (names as strings, dates as aware datetimes, the time as an argument): the
``tls`` module reads the certificates and applies the verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["WARN_BEFORE", "NameIndex", "Validity", "normalise", "validity"]

WARN_BEFORE = timedelta(days=14)


def normalise(name: str) -> str:
    """The form names are compared in: lower case, no trailing dot."""
    return name.rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class NameIndex:
    """Server name to certificate position, built once per set of certificates (two dict lookups per
    handshake at most)."""

    exact: dict[str, int]
    wildcard: dict[str, int]  # the suffix after ``*.``, as ``example.com``

    @classmethod
    def build(cls, names_per_cert: Sequence[Sequence[str]]) -> NameIndex:
        """The index for certificates in order, each with its DNS names."""
        exact: dict[str, int] = {}
        wildcard: dict[str, int] = {}
        for position, names in enumerate(names_per_cert):
            for raw in names:
                name = normalise(raw)
                if name.startswith("*.") and "*" not in name[2:] and name[2:]:
                    wildcard.setdefault(name[2:], position)
                elif "*" not in name and name:
                    exact.setdefault(name, position)
        return cls(exact, wildcard)

    def select(self, server_name: str | None) -> int:
        """The position of the certificate for ``server_name``; 0 (the default) when none matches."""
        if not server_name:
            return 0
        name = normalise(server_name)
        found = self.exact.get(name)
        if found is not None:
            return found
        _, dot, parent = name.partition(".")
        return self.wildcard.get(parent, 0) if dot else 0

    def unreachable(self, count: int) -> list[int]:
        """Positions after the first that no name selects: certificates without DNS names, or whose names
        an earlier certificate already serves."""
        reachable = set(self.exact.values()) | set(self.wildcard.values())
        return [position for position in range(1, count) if position not in reachable]


@dataclass(frozen=True, slots=True)
class Validity:
    """A verdict on a certificate's dates: ``error`` refuses it, ``warning`` accepts it and says why."""

    error: str | None = None
    warning: str | None = None


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def validity(
    not_before: datetime, not_after: datetime, now: datetime, warn_before: timedelta = WARN_BEFORE
) -> Validity:
    """Whether a certificate valid from ``not_before`` to ``not_after`` (aware, UTC) may be served at ``now``."""
    period = f"valid from {_stamp(not_before)} to {_stamp(not_after)}"
    if now > not_after:
        return Validity(error=f"expired on {_stamp(not_after)} ({period})")
    if now < not_before:
        return Validity(error=f"is not valid yet ({period})")
    left = not_after - now
    if left <= warn_before:
        days = left.days
        when = "within a day" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
        return Validity(warning=f"expires {when}, on {_stamp(not_after)}")
    return Validity()
