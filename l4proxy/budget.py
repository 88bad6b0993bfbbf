"""The retry budget and the back-off between retries to the same member.

Budget (Envoy's retry budget): a retry may start only if, counting it, the retries in flight are at
most ``percent`` of the dials in flight (first attempts and retries, counting it too), or at most
``minimum`` (3), whichever allows more. In integers, with r retries and d dials in flight before it::

    (r + 1) * 100 <= max(minimum * 100, (d + 1) * percent)

So a handful of retries always go (a quiet pool with one failing client still retries), while an
outage of every member cannot multiply the connect attempts: at 20% the retries stay a quarter of
the first attempts at most. A refused retry ends that client's session with its last connect error.

Back-off (retries to the member just tried, as in a one-member pool): *full jitter*, the n-th retry
waits ``u * min(cap, base * 2**(n-1))`` for ``u`` uniform in [0, 1), so 25 ms doubling to 250 ms as
the upper bound. Full rather than decorrelated jitter because the case that matters is a herd: many
clients of one member failing at the same moment (a restart), and full jitter spreads them over the
whole window, where decorrelated jitter keeps a floor of ``base`` and clusters the first retries near
it; and full jitter needs only the retry number, while decorrelated needs each client's previous delay.

Pure: the counts are plain ints bumped on the hot path; the random number is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

BACKOFF_BASE = 0.025
BACKOFF_CAP = 0.25


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """Retries in flight may be ``percent`` of the dials in flight, and ``minimum`` at least."""

    percent: int = 20
    minimum: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 100:
            raise ConfigError("retry_budget", self.percent, "must be 0..100 (percent of the dials in flight)")
        if self.minimum < 0:
            raise ConfigError("retry_budget_minimum", self.minimum, "must be 0 or more")


def retry_allowed(retries: int, dials: int, percent: int, minimum: int = 3) -> bool:
    """Whether one more retry may start with ``retries`` and ``dials`` already in flight.

    A function of the counts alone, so a shared table across workers can apply it to global counts.
    """
    return (retries + 1) * 100 <= max(minimum * 100, (dials + 1) * percent)


class RetryBudget:
    """The dials and retries in flight for one pool, and how many retries the budget refused."""

    __slots__ = ("dials", "minimum", "percent", "refused", "retries")

    def __init__(self, policy: BudgetPolicy | None = None) -> None:
        policy = policy or BudgetPolicy()
        self.percent = policy.percent
        self.minimum = policy.minimum
        self.dials = 0
        self.retries = 0
        self.refused = 0

    def dial_started(self) -> None:
        """A client's first connect attempt began."""
        self.dials += 1

    def try_retry(self) -> bool:
        """Start a retry if the budget allows (it is then counted as a dial too); else count a refusal."""
        if retry_allowed(self.retries, self.dials, self.percent, self.minimum):
            self.dials += 1
            self.retries += 1
            return True
        self.refused += 1
        return False

    def dial_ended(self, retry: bool) -> None:
        """An attempt finished, connected or not; ``retry`` says which kind ``try_retry`` made it."""
        self.dials -= 1
        if retry:
            self.retries -= 1

    def __repr__(self) -> str:
        return f"<RetryBudget dials={self.dials} retries={self.retries} refused={self.refused}>"


def retry_delay(retry: int, u: float, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before the ``retry``-th retry (1, 2, ...) to the same member; ``u`` in [0, 1)."""
    if retry < 1:
        raise ValueError(f"retry must be 1 or more, not {retry!r}")
    return u * min(cap, base * 2.0 ** min(retry - 1, 64))  # the exponent's bound keeps the float finite
