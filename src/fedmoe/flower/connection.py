"""Reaching a SuperLink: the address answers, and its TLS certificate is one the given root
certificates vouch for, checked before ``flwr run`` so that a mistake is one line, not a stack of
retries; and the ``flwr`` CLI's connection file for it.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from fedmoe.errors import ConfigError


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port)."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"SuperLink address {address!r} is not host:port (e.g. 10.0.0.5:9093 or [::1]:9093)")
    return host, int(port)


def check_superlink(address: str, root_certificates: str | Path | None = None, insecure: bool = False,
                    timeout: float = 5.0) -> None:
    """Raise a one-line :class:`ConfigError` unless ``address`` accepts a connection and, unless
    ``insecure``, completes a TLS handshake whose certificate chains to ``root_certificates`` and
    names the host."""
    host, port = split_address(address)
    ca = None
    if not insecure:
        if root_certificates is None:
            raise ConfigError(f"SuperLink {address}: give --root-certificates (the CA certificate that signed the "
                              "SuperLink's certificate), or --insecure for a SuperLink started with --insecure")
        ca = Path(root_certificates)
        if not ca.is_file():
            raise ConfigError(f"--root-certificates {ca}: no such file")
        try:
            context = ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError as e:
            raise ConfigError(f"--root-certificates {ca} is not a PEM certificate ({e.reason or e}); "
                              "give the CA certificate (ca.crt)") from None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, TimeoutError) or isinstance(e, socket.timeout):
            why = f"no answer within {timeout:g} s"
        raise ConfigError(f"SuperLink {address} does not answer ({why}); start flower-superlink there "
                          "(--host/--port) or fix the address") from None
    with sock:
        if ca is None:
            return
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as e:
            raise ConfigError(
                f"the certificate of SuperLink {address} does not match --root-certificates {ca} "
                f"({e.verify_message}); give the CA certificate that signed the SuperLink's certificate, whose "
                f"names must include {host}"
            ) from None
        except (ssl.SSLError, OSError) as e:
            reason = getattr(e, "reason", None) or e.strerror or type(e).__name__
            raise ConfigError(
                f"SuperLink {address} does not complete a TLS handshake ({reason}); is it running with --insecure? "
                "Then connect with --insecure, or restart it with --ssl-certfile/--ssl-keyfile"
            ) from None


def write_connection(flwr_home: str | Path, name: str, address: str, root_certificates: str | Path | None = None,
                     insecure: bool = False) -> Path:
    """The ``flwr`` CLI's ``config.toml`` in ``flwr_home`` (use it with ``FLWR_HOME``) with one
    SuperLink connection ``name``, the default; returns the file."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
