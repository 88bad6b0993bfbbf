"""``ssl.SSLContext``s for TLS termination (listeners) and origination (upstreams), built from config.

Decisions:

* **Verification is on by default** when originating TLS: the upstream's certificate must chain to
  ``upstream_ca`` (or, without one, the system trust store) and match the verification name from
  :func:`server_hostname`. Only ``insecure`` turns both checks off.
* **TLS 1.2 is the floor** on both sides (``min_version = "1.3"`` raises it for listeners). Cipher
  suites are Python's secure defaults; compression and renegotiation are off.
* **mTLS**: with ``client_ca`` a listener requires a client certificate that chains to that bundle
  *only*; the system trust store is never used to accept clients.
* **No half-close on TLS**: TLS has ``close_notify`` (which ends the whole connection), not a TCP
  FIN per direction, so a TLS side cannot stay readable after its peer stops writing. When either
  direction of a session with a TLS side ends, the relay flushes what is buffered and closes that side.
* **User mistakes are ConfigErrors**: every certificate, key or CA file is checked before OpenSSL sees
  it, and any ``OSError``/``ssl.SSLError`` from loading is turned into a one-line ``ConfigError`` naming
  the field of the TLS config (``cert``, ``key``, ``client_ca``, ``ca``, ``alpn``; the caller places it
  under its listener or pool), the path and what is wrong.

The module opens files but no sockets and knows nothing of the event loop: the listener and dialer pass
these contexts to ``loop.create_server``/``create_connection`` (or ``start_tls``) and call
:func:`describe` on ``transport.get_extra_info("ssl_object")`` for the access log.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import weakref
from pathlib import Path
from typing import Any

from .config import ServerTLSConfig, UpstreamTLSConfig
from .errors import ConfigError

__all__ = ["client_context", "describe", "server_context", "server_hostname"]

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_HARDENING = ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)

# The SNI name each server-side connection asked for. Python has no getter for it on the server side,
# so the sni_callback installed by server_context() records it here; weak keys let the entry vanish
# with its SSLObject/SSLSocket.
_SNI_SEEN: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# --- contexts --------------------------------------------------------------------------------------


def server_context(cfg: ServerTLSConfig) -> ssl.SSLContext:
    """A context that terminates TLS with ``cfg.cert``/``cfg.key`` and, with ``client_ca``, requires mTLS.

    Built on ``PROTOCOL_TLS_SERVER`` rather than ``create_default_context(CLIENT_AUTH)``: the latter
    loads the system CAs, which would let any publicly issued certificate pass as a client certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS[cfg.min_version]
    ctx.options |= _HARDENING
    _load_cert_chain(ctx, cfg.cert, cfg.key, "cert", "key")
    if cfg.client_ca is not None:
        _load_ca(ctx, cfg.client_ca, "client_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    _set_alpn(ctx, cfg.alpn, "alpn")
    ctx.sni_callback = _remember_sni
    return ctx


def client_context(cfg: UpstreamTLSConfig) -> ssl.SSLContext:
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
        _load_cert_chain(ctx, cfg.cert, cfg.key, "cert", "key")
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
    if not p.exists():
        raise ConfigError(field, path, "file not found")
    if p.is_dir():
        raise ConfigError(field, path, "is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise ConfigError(field, path, "not readable (permission denied)")
    try:
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


def _load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str, cert_field: str, key_field: str) -> None:
    if not _has_pem_certificate(_read_file(cert, cert_field)):
        raise ConfigError(cert_field, cert, "is not a PEM certificate")
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
    ctx.set_alpn_protocols(list(protocols))


def _ssl_reason(exc: ssl.SSLError) -> str:
    """`` (reason)`` from OpenSSL's reason code, or nothing: its bare messages ("PEM lib") add nothing."""
    return f" ({exc.reason.lower().replace('_', ' ')})" if exc.reason else ""
