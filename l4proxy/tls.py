"""``ssl.SSLContext``s for TLS termination (listeners) and origination (upstreams), built from config.

Decisions:

* **Verification is on by default** when originating TLS: the upstream's certificate must chain to
  ``upstream_ca`` (or, without one, the system trust store) and match the verification name from
  :func:`server_hostname`. Only ``insecure`` turns both checks off.
* **TLS 1.2 is the floor** on both sides (``min_version = "1.3"`` raises it for listeners);
  compression and renegotiation are off.
* **Termination follows Mozilla's "intermediate" profile**: TLS 1.2 with ECDHE key exchange and AEAD
  ciphers only (AES-GCM, ChaCha20-Poly1305; no CBC, no RSA or DHE key exchange), and TLS 1.3 with
  OpenSSL's suites, which are all AEAD and which Python 3.11's ``ssl`` cannot change. The server
  chooses among the ciphers both sides offer, except that a client that puts ChaCha20 first (one
  without AES instructions) gets it. ``ciphers`` replaces the TLS 1.2 list. Origination keeps Python's
  defaults: the upstream is ours to configure.
* **Session resumption**: OpenSSL issues session tickets (two per TLS 1.3 handshake; RFC 5077 tickets
  on TLS 1.2) and keeps a server-side session cache, so a returning client skips the certificate and
  key exchange. The ticket key is random per context (so per worker process) and lives as long as the
  context does: a reload builds new contexts and so a new key (older tickets then fall back to a full
  handshake). Python offers no way to set or rotate the key on a live context. The certificate that
  SNI selects does not matter: OpenSSL seals tickets with the key of the context the handshake began on.
* **Several certificates** per listener: one context per certificate, all with the same settings. The
  first is the one the listener is given and the default; with two or more, its ``sni_callback``
  switches a handshake to the certificate the SNI name selects (``certrules.NameIndex``, built once per
  load). With one certificate no selection runs.
* **Dates are checked at load**, for our certificates on both sides: a leaf certificate outside its
  validity period is a ConfigError naming the file and the dates; one that expires within 14 days
  loads with a warning.
* **mTLS**: with ``client_ca`` a listener requires a client certificate that chains to that bundle
  *only*; the system trust store is never used to accept clients.
* **Half-close on TLS**: close_notify ends the sender's direction only (RFC 8446 6.1; OpenSSL lets
  TLS 1.2 do the same), so a TLS side half-closes as a plain one does: ``tlsengine.py`` runs these
  contexts on an ``SSLObject`` under the relay and sends close_notify where a plain side sends FIN.
* **User mistakes are ConfigErrors**: every certificate, key or CA file is checked before OpenSSL sees
  it, and any ``OSError``/``ssl.SSLError`` from loading is turned into a one-line ``ConfigError`` naming
  the field of the TLS config (``cert``, ``key``, ``client_ca``, ``ca``, ``alpn``, ``ciphers``; with
  several certificates ``cert[1]``; the caller places it under its listener or pool), the path and
  what is wrong. Warnings take the same shape and go to the ``warn`` callback the caller passes.

The module opens files but no sockets and knows nothing of the event loop: the frontend and dialer run
these contexts in ``tlsengine.TLSEngine`` (the health probes through the dialer's ``connect_tls``) and
call :func:`describe` on ``transport.get_extra_info("ssl_object")`` for the access log.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from .certrules import NameIndex, validity
from .config import ServerTLSConfig, UpstreamTLSConfig
from .errors import ConfigError

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "Warn",
    "client_context",
    "describe",
    "reload_server_context",
    "server_context",
    "server_hostname",
    "warn_under",
]

# Something worth saying that does not stop the load (a certificate about to expire); same shape as an error.
Warn = Callable[[ConfigError], None]

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_HARDENING = ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)

# Mozilla's "intermediate" TLS 1.2 ciphers without its DHE ones: ECDHE key exchange, AEAD only.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))  # fmt: skip
# SSL_OP_PRIORITIZE_CHACHA (OpenSSL 1.1.1+, not exported by Python's ssl): under server preference, a
# client that lists ChaCha20 first gets it, since it has no AES instructions to make AES-GCM fast.
_OP_PRIORITIZE_CHACHA = 1 << 21

# The SNI name each server-side connection asked for. Python has no getter for it on the server side,
# so the sni_callback installed by server_context() records it here; weak keys let the entry vanish
# with its SSLObject/SSLSocket.
_SNI_SEEN: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# --- contexts --------------------------------------------------------------------------------------


def warn_under(warn: Warn | None, prefix: str) -> Warn | None:
    """``warn`` for the warnings of a TLS config that sits at ``prefix`` in the tree (``listeners[0].tls``)."""
    return None if warn is None else lambda exc: warn(exc.under(prefix))


def server_context(cfg: ServerTLSConfig, warn: Warn | None = None) -> ssl.SSLContext:
    """The context a listener terminates TLS with: its default certificate and, with two or more, the
    selection of the others by SNI. Raises the first ConfigError; ``warn`` hears the rest."""
    loaded = [_pair_context(cfg, position, warn) for position in range(len(cfg.pairs))]
    return _with_selection(loaded, cfg, warn)


def reload_server_context(
    cfg: ServerTLSConfig, current: ssl.SSLContext, warn: Warn | None = None
) -> tuple[ssl.SSLContext, list[ConfigError]]:
    """Re-read each certificate of ``current`` (built by :func:`server_context` for ``cfg``): a pair whose
    files are broken keeps its previous context, the others take the new files. Returns the context for
    the listener (``current`` itself when the default certificate's reload failed) and the problems."""
    selector = current.sni_callback
    old: list[_Loaded] = (
        [(current, selector.names[0]), *zip(selector.contexts, selector.names[1:], strict=True)]
        if isinstance(selector, _Selector)
        else [(current, ())]
    )
    loaded: list[_Loaded] = []
    problems: list[ConfigError] = []
    for position, kept in enumerate(old):
        try:
            loaded.append(_pair_context(cfg, position, warn))
        except ConfigError as exc:
            problems.append(exc)
            loaded.append(kept)
    return _with_selection(loaded, cfg, warn), problems


def client_context(cfg: UpstreamTLSConfig, warn: Warn | None = None) -> ssl.SSLContext:
    """A context that originates TLS to members: verifying by default, optionally presenting a client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _HARDENING
    if cfg.insecure:
        ctx.check_hostname = False  # must precede CERT_NONE
        ctx.verify_mode = ssl.CERT_NONE
    elif cfg.ca is not None:
        _load_ca(ctx, cfg.ca, "ca")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.cert is not None and cfg.key is not None:
        _load_cert_chain(ctx, cfg.cert, cfg.key, "cert", "key", warn)
    _set_alpn(ctx, cfg.alpn, "alpn")
    return ctx


def server_hostname(cfg: UpstreamTLSConfig, member_host: str) -> str | None:
    """The name to pass as ``server_hostname`` when dialing ``member_host``: it is both SNI and the name
    the certificate is checked against.

    ``cfg.sni`` wins; otherwise the member's own host. A DNS name is sent as SNI (trailing dot removed,
    as RFC 6066 requires). An IP literal is returned as is: Python's ssl then matches it against the
    certificate's IP-address SANs and does *not* send SNI (RFC 6066 forbids IP literals in SNI), so an
    upstream that needs SNI while being dialed by IP needs ``sni``. An IPv6 zone (``%eth0``) is dropped,
    since certificates cannot name it. ``None`` only for an empty host.
    """
    name = cfg.sni or member_host
    if not name:
        return None
    try:
        return str(ipaddress.ip_address(name.split("%", 1)[0]))
    except ValueError:
        return name.rstrip(".")


# --- one context per certificate, chosen by SNI ---------------------------------------------------

# A certificate's context and the DNS names of its subjectAltName.
_Loaded = tuple[ssl.SSLContext, tuple[str, ...]]


def _pair_context(cfg: ServerTLSConfig, position: int, warn: Warn | None) -> _Loaded:
    """The context for ``cfg``'s certificate at ``position``, and its names.

    Built on ``PROTOCOL_TLS_SERVER`` rather than ``create_default_context(CLIENT_AUTH)``: the latter
    loads the system CAs, which would let any publicly issued certificate pass as a client certificate.
    """
    several = len(cfg.pairs) > 1
    cert, key = cfg.pairs[position]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # server cipher preference is on by default
    ctx.minimum_version = _MIN_VERSIONS[cfg.min_version]
    ctx.options |= _HARDENING | _OP_PRIORITIZE_CHACHA
    _set_ciphers(ctx, cfg.ciphers)
    index = f"[{position}]" if several else ""
    names = _load_cert_chain(ctx, cert, key, f"cert{index}", f"key{index}", warn)
    if cfg.client_ca is not None:
        _load_ca(ctx, cfg.client_ca, "client_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    _set_alpn(ctx, cfg.alpn, "alpn")
    return ctx, names


def _set_ciphers(ctx: ssl.SSLContext, ciphers: str | None) -> None:
    try:
        ctx.set_ciphers(INTERMEDIATE_CIPHERS if ciphers is None else ciphers)
    except ssl.SSLError:
        raise ConfigError("ciphers", ciphers, "OpenSSL knows no TLS 1.2 cipher in this list") from None


def _with_selection(loaded: list[_Loaded], cfg: ServerTLSConfig, warn: Warn | None) -> ssl.SSLContext:
    """The first context, with an ``sni_callback`` that records the name and, when there are several
    certificates, moves the handshake to the one the name selects. A certificate no name can select
    is worth a warning: it was listed for nothing."""
    default = loaded[0][0]
    if len(loaded) == 1:
        default.sni_callback = _remember_sni
        return default
    names = tuple(names for _, names in loaded)
    index = NameIndex.build(names)
    for position in index.unreachable(len(loaded)):
        if warn is not None:
            problem = "no SNI name selects it: it has no DNS names, or earlier certificates serve them all"
            warn(ConfigError(f"cert[{position}]", cfg.pairs[position][0], problem))
    default.sni_callback = _Selector(index, tuple(ctx for ctx, _ in loaded[1:]), names)
    return default


class _Selector:
    """``sni_callback`` for a listener with several certificates. Holds the contexts after the first
    (the one the callback is installed on: holding it too would make a reference cycle) and every
    certificate's names, which a reload keeps for a certificate whose new files are broken."""

    __slots__ = ("contexts", "index", "names")

    def __init__(
        self, index: NameIndex, contexts: tuple[ssl.SSLContext, ...], names: tuple[tuple[str, ...], ...]
    ) -> None:
        self.index = index
        self.contexts = contexts
        self.names = names

    def __call__(self, ssl_object: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name is None:
            return
        _SNI_SEEN[ssl_object] = name
        position = self.index.select(name)
        if position:
            ssl_object.context = self.contexts[position - 1]


# --- access-log facts ------------------------------------------------------------------------------


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> dict[str, str | None]:
    """TLS facts of an established connection: ``sni``, ``version``, ``alpn``, ``cipher``, ``peer_cn``.

    Works on either end. Server side, ``sni`` is what the client asked for (recorded by the
    ``sni_callback`` of :func:`server_context`; ``None`` when the client sent none). Client side it is
    the ``server_hostname`` we sent, ``None`` for an IP literal (not sent). ``peer_cn`` is the
    subject CN of a *verified* peer certificate (client certificates under mTLS, upstream certificates
    unless ``insecure``). ``None`` (for instance a plain connection) gives all ``None``s.
    """
    facts: dict[str, str | None] = dict.fromkeys(("sni", "version", "alpn", "cipher", "peer_cn"))
    if ssl_object is None:
        return facts
    cipher = ssl_object.cipher()
    facts.update(
        sni=_sni_of(ssl_object),
        version=ssl_object.version(),
        alpn=ssl_object.selected_alpn_protocol(),
        cipher=cipher[0] if cipher else None,
        peer_cn=_peer_cn(ssl_object),
    )
    return facts


def _remember_sni(ssl_object: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
    """``sni_callback``: record the requested name; returning None lets the handshake continue."""
    if name is not None:
        _SNI_SEEN[ssl_object] = name


def _sni_of(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    if ssl_object.server_side:
        return _SNI_SEEN.get(ssl_object)
    name = ssl_object.server_hostname
    if name is None:
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


def _peer_cn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):  # handshake not done
        return None
    subject: Any = (cert or {}).get("subject", ())  # typeshed's type for it is looser than the data
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


# --- loading files with precise errors -------------------------------------------------------------


class _EncryptedKey(Exception):
    """Raised from the password callback: we never prompt for a passphrase on the terminal."""


def _no_password() -> bytes:
    raise _EncryptedKey


def _read_file(path: str, field: str) -> bytes:
    """The file's bytes, or a ConfigError saying why it cannot be used (before OpenSSL gets vaguer)."""
    p = Path(path)
    try:  # a path too long for the system fails even the stat
        if not p.exists():
            raise ConfigError(field, path, "file not found")
        if p.is_dir():
            raise ConfigError(field, path, "is a directory, not a file")
        if not os.access(p, os.R_OK):
            raise ConfigError(field, path, "not readable (permission denied)")
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(field, path, f"not readable ({exc.strerror or exc})") from None


def _has_pem_certificate(data: bytes) -> bool:
    """True when ``data`` holds at least one PEM certificate OpenSSL can parse."""
    if b"-----BEGIN CERTIFICATE-----" not in data and b"-----BEGIN TRUSTED CERTIFICATE-----" not in data:
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        return False
    return True


def _load_cert_chain(
    ctx: ssl.SSLContext, cert: str, key: str, cert_field: str, key_field: str, warn: Warn | None
) -> tuple[str, ...]:
    """Load a certificate chain and its key into ``ctx``; the leaf's DNS names."""
    cert_data = _read_file(cert, cert_field)
    if not _has_pem_certificate(cert_data):
        raise ConfigError(cert_field, cert, "is not a PEM certificate")
    names = _check_leaf(cert_data, cert, cert_field, warn)
    key_data = _read_file(key, key_field)
    if b"PRIVATE KEY-----" not in key_data:
        raise ConfigError(key_field, key, "is not a PEM private key")
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(key_field, key, "is encrypted; give an unencrypted key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(key_field, key, f"key does not match the certificate {cert!r}") from None
        raise ConfigError(key_field, key, "is not a valid PEM private key" + _ssl_reason(exc)) from None
    except OSError as exc:  # the file changed between the checks and the load
        raise ConfigError(cert_field, cert, f"could not be loaded ({exc.strerror or exc})") from None
    return names


def _check_leaf(data: bytes, path: str, field: str, warn: Warn | None) -> tuple[str, ...]:
    """Refuse a leaf certificate outside its validity period, warn about one that ends soon; its DNS names.

    Only the leaf (the first certificate): an expired cross-signed intermediate later in a chain file is
    common and harmless to clients that have the newer root."""
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError:  # a form OpenSSL reads and cryptography does not (TRUSTED CERTIFICATE)
        return ()
    verdict = validity(leaf.not_valid_before_utc, leaf.not_valid_after_utc, datetime.now(UTC))
    if verdict.error is not None:
        raise ConfigError(field, path, verdict.error)
    if verdict.warning is not None and warn is not None:
        warn(ConfigError(field, path, verdict.warning))
    try:
        alt_names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(alt_names.get_values_for_type(x509.DNSName))


def _load_ca(ctx: ssl.SSLContext, path: str, field: str) -> None:
    if not _has_pem_certificate(_read_file(path, field)):
        raise ConfigError(field, path, "is not a valid CA bundle (no PEM certificate found)")
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(field, path, "is not a valid CA bundle" + _ssl_reason(exc)) from None
    except OSError as exc:
        raise ConfigError(field, path, f"could not be loaded ({exc.strerror or exc})") from None


def _set_alpn(ctx: ssl.SSLContext, protocols: tuple[str, ...], field: str) -> None:
    if not protocols:
        return
    for proto in protocols:
        if not 1 <= len(proto.encode("utf-8", "replace")) <= 255:
            raise ConfigError(field, proto, "an ALPN protocol name must be 1 to 255 bytes")
        if not proto.isascii():  # what OpenSSL is given is ASCII
            raise ConfigError(field, proto, "an ALPN protocol name must be ASCII")
    ctx.set_alpn_protocols(list(protocols))


def _ssl_reason(exc: ssl.SSLError) -> str:
    """`` (reason)`` from OpenSSL's reason code, or nothing: its bare messages ("PEM lib") add nothing."""
    return f" ({exc.reason.lower().replace('_', ' ')})" if exc.reason else ""
