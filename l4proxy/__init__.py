"""l4proxy: a layer-4 (TCP) ambassador proxy on uvloop.

It accepts TCP clients and relays their bytes, unchanged, to one member of a pool of upstreams, so it
works with any protocol (Redis, PostgreSQL, MySQL, line protocols). Around the relay it does the work a
client should not have to:

* weighted least-connections over healthy members, idle members sharing ties evenly, with per-member
  caps (``max_conns``), backup members and slow start;
* connection-level retries: a refused, unreachable or timed-out connect moves on to another member,
  invisible to the client. Nothing is retried once a byte has gone upstream;
* health checks: active probes (TCP connect, or send/expect such as Redis ``PING``/``+PONG``) with
  rise/fall hysteresis, and passive marking from failed client connects;
* half-close passed through both ways, bounded buffers with backpressure, idle timeouts;
* the PROXY protocol (v1 and v2) both ways: the real client's address sent to members, and read from
  a load balancer in front; CIDR allow/deny rules and per-address connection and rate limits;
* one access-log line per session; graceful drain on SIGTERM.

What it does not do: it never parses or rewrites the byte stream (a PROXY header it reads is taken off
before the stream, one it sends is put before it), never retries after relaying, and does not route by
content (every client of a listener goes to that listener's pool).

Embedding::

    from l4proxy import Proxy, Config, ListenerConfig, MemberConfig, PoolConfig, Address

    config = Config(listeners=(ListenerConfig(Address("127.0.0.1", 0)),),
                    pools=(PoolConfig(members=(MemberConfig(Address("127.0.0.1", 6379), weight=2),)),))
    async with Proxy(config) as proxy:
        print(proxy.port())
"""

from .config import (
    Address,
    Config,
    HealthConfig,
    ListenerConfig,
    MemberConfig,
    PoolConfig,
    ServerTLSConfig,
    UpstreamTLSConfig,
)
from .errors import ConfigError, L4ProxyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .proxy import Proxy


def __getattr__(name: str) -> object:
    """``Proxy`` is imported on first use, so importing a pure module (``l4proxy.config``) does not
    pull in the event loop, sockets and TLS."""
    if name == "Proxy":
        from .proxy import Proxy

        return Proxy
    raise AttributeError(f"module 'l4proxy' has no attribute {name!r}")


__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "HealthConfig",
    "L4ProxyError",
    "ListenerConfig",
    "MemberConfig",
    "PoolConfig",
    "Proxy",
    "ServerTLSConfig",
    "UpstreamTLSConfig",
]
__version__ = "0.1.0"
