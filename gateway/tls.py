"""TLS files named on the command line, checked before gRPC sees them.

gRPC reports an unusable PEM only as "Failed to bind" (server) or a failed handshake (client);
OpenSSL, through the ssl module, says which file is wrong and why.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientTLS:
    """PEM bytes for ``grpc.ssl_channel_credentials``: the CA to trust (None: the system's) and
    the client's identity (both None: none)."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key,
                                            self.certificate_chain)


def client_tls(ca: Path | None, cert: Path | None = None,
               key: Path | None = None) -> ClientTLS | None:
    """The client TLS settings of --tls-ca/--tls-cert/--tls-key (None: plaintext).

    ValueError with a one-line message naming the flag and file when one is unusable.
    """
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if ca is not None:
        check_certificates(ca, "--tls-ca")
    if cert is not None:
        check_certificates(cert, "--tls-cert")
        check_key_pair(cert, key, "--tls-key")
    return ClientTLS(_read(ca), _read(key), _read(cert))


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


def check_server_files(cert: Path, key: Path, client_ca: Path | None = None) -> None:
    """ValueError naming the file when a server's PEM certificate, key or client CA is unusable.

    gRPC only says "Failed to bind" for any of these; OpenSSL (the ssl module) says which.
    """
    check_certificates(cert, "TLS certificate")
    if client_ca is not None:
        check_certificates(client_ca, "TLS client CA")
    check_key_pair(cert, key)


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS for the HTTP port from the gRPC port's files: the same certificate, and with a
    client CA the same requirement that clients present a certificate it signed."""
    check_server_files(cert, key, client_ca)  # ValueError naming the file
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_certificates(path: Path, what: str) -> None:
    """ValueError unless ``path`` holds at least one PEM certificate."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what} {path} is not a valid PEM certificate "
                         f"({_ssl_reason(exc)})") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None


def check_key_pair(cert: Path, key: Path, what: str = "TLS key") -> None:
    """ValueError unless ``key`` is an unencrypted PEM private key matching ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback keeps OpenSSL from prompting on the terminal for an encrypted
        # key (gRPC cannot use one either).
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if getattr(exc, "reason", "") == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{what} {key} does not match certificate {cert}") from None
        raise ValueError(f"{what} {key} is not a valid unencrypted PEM private key "
                         f"({_ssl_reason(exc)})") from None
    except OSError as exc:
        raise ValueError(f"{what} {key}: {exc.strerror or exc}") from None


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    if reason is None or reason == "PEM_LIB":
        return "it does not parse as PEM"  # OpenSSL's "[SSL] PEM lib (_ssl.c:3926)"
    return str(reason).replace("_", " ").lower()
