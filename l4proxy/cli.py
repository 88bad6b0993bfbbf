"""The ``l4proxy`` command: flags to a Config, Config to a running Proxy, errors to one line.

Only this module turns errors into exit codes: 2 for a user mistake (bad flag, bad value, missing
file), 1 when the proxy cannot start (address in use), 0 after a graceful drain.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from .accesslog import AccessLog
from .config import (
    LOG_LEVELS,
    RELAY_ENGINES,
    Config,
    HealthConfig,
    ListenerConfig,
    PoolConfig,
    ServerTLSConfig,
    UpstreamTLSConfig,
    parse_address,
    parse_duration,
    parse_escapes,
    parse_members,
)
from .errors import ConfigError
from .proxy import Proxy
from .workers import parse_workers, supervise

log = logging.getLogger("l4proxy")

# Config field names as the user knows them on the command line.
FLAG_FOR_FIELD = {
    "listen": "--listen",
    "upstream": "--upstream",
    "retries": "--retries",
    "connect_timeout": "--connect-timeout",
    "idle_timeout": "--idle-timeout",
    "half_closed_timeout": "--half-closed-timeout",
    "drain_timeout": "--drain-timeout",
    "health_interval": "--health-interval",
    "health_timeout": "--health-timeout",
    "rise": "--rise",
    "fall": "--fall",
    "buffer_size": "--buffer-size",
    "relay": "--relay",
    "eject_time": "--eject-time",
    "log_level": "--log-level",
    "access_log": "--access-log",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_client_ca": "--tls-client-ca",
    "tls_alpn": "--tls-alpn",
    "tls_handshake_timeout": "--tls-handshake-timeout",
    "tls_min_version": "--tls-min-version",
    "upstream_ca": "--upstream-ca",
    "upstream_cert": "--upstream-cert",
    "upstream_key": "--upstream-key",
    "upstream_alpn": "--upstream-alpn",
}


def flagged(exc: ConfigError) -> ConfigError:
    """The same error, naming the command-line flag instead of the config field."""
    flag = FLAG_FOR_FIELD.get(exc.field)
    return exc if flag is None else ConfigError(flag, exc.value, exc.problem)


def _duration(flag: str) -> Callable[[click.Context, click.Parameter, str], float]:
    def convert(ctx: click.Context, param: click.Parameter, value: str) -> float:
        return parse_duration(value, flag)

    return convert


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    text = value.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if text.endswith("ib"):
        scale, digits = {"kib": 1024, "mib": 1024 * 1024}.get(text[-3:], 0), text[:-3]
    # isdigit() alone lets '²' through to int(), which refuses it, as it refuses over 4300 digits
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18) or not scale:
        raise ConfigError("--buffer-size", value, "expected bytes such as 65536, 64k or 1m")
    return int(digits) * scale


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--listen",
    required=True,
    metavar="[HOST]:PORT",
    help="Address to accept clients on; ':PORT' means every interface, '[::1]:PORT' for IPv6.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    required=True,
    metavar="HOST[:PORT],...",
    help="Pool members, comma-separated and/or repeated; the port defaults to the listen port.",
)
@click.option(
    "--connect-timeout",
    default="5s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--connect-timeout"),
    help="Give up on one connect attempt after this long and try another member.",
)
@click.option(
    "--retries",
    default=2,
    show_default=True,
    type=int,
    help="Extra connect attempts after the first, each to a member not yet tried.",
)
@click.option(
    "--idle-timeout",
    default="1h",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--idle-timeout"),
    help="Close a session with no traffic in either direction for this long.",
)
@click.option(
    "--half-closed-timeout",
    default="30s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--half-closed-timeout"),
    help="Idle timeout once one direction has ended (HAProxy's 'timeout client-fin').",
)
@click.option(
    "--drain-timeout",
    default="30s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--drain-timeout"),
    help="On SIGTERM/SIGINT, how long sessions may finish before they are closed.",
)
@click.option(
    "--health-interval",
    default="2s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--health-interval"),
    help="Time between active health probes of each member.",
)
@click.option(
    "--health-timeout",
    default="1s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--health-timeout"),
    help="A probe that takes longer fails.",
)
@click.option(
    "--rise",
    default=2,
    show_default=True,
    type=int,
    help="Consecutive passing probes that bring a DOWN member back UP.",
)
@click.option(
    "--fall",
    default=3,
    show_default=True,
    type=int,
    help="Consecutive failures (probes or client connects) that take an UP member DOWN.",
)
@click.option(
    "--health-send",
    default="",
    metavar="BYTES",
    help=r"Probe payload to send after connecting, e.g. 'PING\r\n' (escapes \r \n \t \xNN).",
)
@click.option(
    "--health-expect",
    default="",
    metavar="BYTES",
    help="The probe passes only if the reply starts with these bytes, e.g. '+PONG'.",
)
@click.option("--no-health-checks", is_flag=True, help="Turn active probes off (passive marking stays).")
@click.option(
    "--eject-time",
    default="10s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--eject-time"),
    help="With --no-health-checks, how long a member taken DOWN by failed connects stays out.",
)
@click.option(
    "--buffer-size",
    default="64k",
    show_default=True,
    metavar="SIZE",
    callback=_size,
    help="Per-direction buffer high-water mark; a slower peer pauses the faster one.",
)
@click.option(
    "--relay",
    default="auto",
    show_default=True,
    type=click.Choice(RELAY_ENGINES),
    help="Relay engine: 'auto' moves bulky plain-TCP sessions to zero-copy splice, 'splice' does so for"
    " every plain-TCP session, 'transport' never (TLS sessions always use transports).",
)
@click.option("--tls-cert", metavar="PEM", help="Terminate TLS from clients with this certificate chain.")
@click.option("--tls-key", metavar="PEM", help="The private key of --tls-cert.")
@click.option("--tls-client-ca", metavar="PEM", help="Require client certificates signed by this CA (mTLS).")
@click.option("--tls-alpn", default="", metavar="LIST", help="ALPN protocols offered to clients, e.g. h2,http/1.1.")
@click.option(
    "--tls-handshake-timeout",
    default="10s",
    show_default=True,
    metavar="DURATION",
    callback=_duration("--tls-handshake-timeout"),
    help="Close clients that do not finish the handshake.",
)
@click.option(
    "--tls-min-version",
    default="1.2",
    show_default=True,
    type=click.Choice(["1.2", "1.3"]),
    help="Oldest TLS version accepted from clients.",
)
@click.option("--upstream-tls", is_flag=True, help="Speak TLS to the upstreams (verified by default).")
@click.option(
    "--upstream-ca",
    metavar="PEM",
    help="CA bundle that upstream certificates must chain to [default: the system trust store].",
)
@click.option("--upstream-sni", metavar="NAME", help="Server name sent and verified [default: the member's host].")
@click.option("--upstream-cert", metavar="PEM", help="Client certificate presented to upstreams (mTLS).")
@click.option("--upstream-key", metavar="PEM", help="The private key of --upstream-cert.")
@click.option("--upstream-alpn", default="", metavar="LIST", help="ALPN protocols offered to upstreams.")
@click.option("--upstream-insecure", is_flag=True, help="Do not verify upstream certificates (warns at start-up).")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS),
    help="Level of the diagnostic log on stderr.",
)
@click.option(
    "--access-log",
    default="-",
    show_default=True,
    metavar="-|PATH|off",
    help="One line per session: '-' for stdout, a file path, or 'off'.",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    metavar="N|auto",
    callback=lambda _ctx, _param, value: parse_workers(value),
    help="Processes accepting on the address (SO_REUSEPORT); 'auto' = one per CPU.",
)
def command(**options: Any) -> None:
    """A layer-4 (TCP) proxy: least-connections, retries and health checks in front of any service.

    Example: l4proxy --listen :6379 --upstream redis-a,redis-b
    """
    config = build_config(options)
    _setup_logging(config.log_level)
    check_tls_files(config)
    if any(p.tls is not None and p.tls.insecure for p in config.pools):
        log.warning(
            "--upstream-insecure: upstream certificates are NOT verified; anyone on the path can"
            " impersonate an upstream"
        )
    try:
        access_log = AccessLog.from_target(config.access_log)
    except OSError as exc:
        raise ConfigError("--access-log", config.access_log, exc.strerror or str(exc)) from None
    raise_nofile_limit()
    if options["workers"] > 1:
        sys.exit(supervise(config, options["workers"], access_log, run))
    sys.exit(run(config, access_log))


def build_config(options: dict[str, Any]) -> Config:
    """The Config for parsed flags; ConfigErrors name the flag."""
    try:
        listen = parse_address(options["listen"], "--listen")
        members = parse_members(options["upstreams"], "--upstream", default_port=listen.port)
        health = HealthConfig(
            interval=options["health_interval"],
            timeout=options["health_timeout"],
            rise=options["rise"],
            fall=options["fall"],
            send=parse_escapes(options["health_send"], "--health-send"),
            expect=parse_escapes(options["health_expect"], "--health-expect"),
            enabled=not options["no_health_checks"],
            eject_time=options["eject_time"],
        )
        pool = PoolConfig(
            members=members,
            retries=options["retries"],
            connect_timeout=options["connect_timeout"],
            health=health,
            tls=_upstream_tls(options),
        )
        listener = ListenerConfig(
            address=listen,
            idle_timeout=options["idle_timeout"],
            half_closed_timeout=options["half_closed_timeout"],
            buffer_size=options["buffer_size"],
            tls=_server_tls(options),
            relay=options["relay"],
        )
        return Config(
            listeners=(listener,),
            pools=(pool,),
            drain_timeout=options["drain_timeout"],
            access_log=options["access_log"],
            log_level=options["log_level"],
        )
    except ConfigError as exc:
        raise flagged(exc) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _server_tls(options: dict[str, Any]) -> ServerTLSConfig | None:
    cert, key = options["tls_cert"], options["tls_key"]
    if cert is None and key is None:
        for flag in ("tls_client_ca", "tls_alpn"):
            if options[flag]:
                raise ConfigError(FLAG_FOR_FIELD[flag], options[flag], "needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        missing, given = ("--tls-key", "--tls-cert") if key is None else ("--tls-cert", "--tls-key")
        raise ConfigError(missing, None, f"required with {given}")
    return ServerTLSConfig(
        cert=cert,
        key=key,
        client_ca=options["tls_client_ca"],
        alpn=_names(options["tls_alpn"]),
        handshake_timeout=options["tls_handshake_timeout"],
        min_version=options["tls_min_version"],
    )


def _upstream_tls(options: dict[str, Any]) -> UpstreamTLSConfig | None:
    names = ("upstream_ca", "upstream_sni", "upstream_cert", "upstream_key", "upstream_alpn", "upstream_insecure")
    if not options["upstream_tls"]:
        given = next((n for n in names if options[n]), None)
        if given:
            raise ConfigError("--" + given.replace("_", "-"), None, "needs --upstream-tls")
        return None
    if (options["upstream_cert"] is None) != (options["upstream_key"] is None):
        missing = "--upstream-key" if options["upstream_key"] is None else "--upstream-cert"
        raise ConfigError(missing, None, "--upstream-cert and --upstream-key go together")
    return UpstreamTLSConfig(
        ca=options["upstream_ca"],
        sni=options["upstream_sni"],
        cert=options["upstream_cert"],
        key=options["upstream_key"],
        alpn=_names(options["upstream_alpn"]),
        insecure=options["upstream_insecure"],
    )


def check_tls_files(config: Config) -> None:
    """Load every certificate, key and CA once before binding, so a bad file is a start-up error."""
    from .tls import client_context, server_context

    try:
        for listener in config.listeners:
            if listener.tls is not None:
                server_context(listener.tls)
        for pool in config.pools:
            if pool.tls is not None:
                client_context(pool.tls)
    except ConfigError as exc:
        raise flagged(exc) from None


def run(config: Config, access_log: AccessLog | None = None, prepare: Callable[[Proxy], None] | None = None) -> int:
    """Run the proxy on uvloop until SIGTERM/SIGINT; the exit status. ``prepare`` adjusts the Proxy
    before it starts (a worker process plugs in the shared table)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, access_log, prepare))


async def serve(
    config: Config, access_log: AccessLog | None = None, prepare: Callable[[Proxy], None] | None = None
) -> int:
    """Start, wait for a signal, drain; a second signal closes the remaining sessions at once."""
    proxy = Proxy(config, access_log)
    if prepare is not None:
        prepare(proxy)
    try:
        await proxy.start()
    except OSError as exc:
        print(f"l4proxy: error: cannot listen on {config.listeners[0].address}: {exc.strerror or exc}", file=sys.stderr)
        proxy.access_log.close()
        return 1
    tune_gc()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        if len(received) == 1:
            log.info("%s received: draining for up to %.1fs (again to force)", name, config.drain_timeout)
            proxy.stop()
        else:
            proxy.abort_all("forced_shutdown")

    def on_reload() -> None:
        problems = proxy.reload_tls()
        for problem in problems:
            log.error("SIGHUP: kept the previous TLS files: %s", flagged(problem))
        if not problems:
            log.info("SIGHUP: TLS certificates and keys reloaded")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        await proxy.serve_until_stopped()
        await proxy.drain()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped after %d sessions", proxy.served)
    return 0


def tune_gc() -> None:
    """Collect cyclic garbage less often. Every session allocates a few dozen objects, so the default
    threshold (700) ran a collection every dozen connections, about 6% of the CPU under a connection
    storm; and freeze what start-up built, so no collection scans it again."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def raise_nofile_limit() -> None:
    """Raise the soft open-files limit to the hard limit, as HAProxy does, so each session can have
    its two descriptors under load."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for user mistakes, never a traceback for them."""
    try:
        command.main(args=argv, prog_name="l4proxy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        _fail(exc.format_message())
    except ConfigError as exc:
        _fail(str(flagged(exc)))
    except click.exceptions.Abort:
        sys.exit(130)


def _fail(message: str) -> None:
    print(f"l4proxy: error: {message}", file=sys.stderr)
    sys.exit(2)
