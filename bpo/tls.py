"""TLS for the gRPC servers and their clients, from files the operator names (never from a caller)."""

from __future__ import annotations

from pathlib import Path

import grpc

from bpo.errors import InvalidConfigurationError
from bpo.settings import ClientSettings, PlatformSettings


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidConfigurationError(f"cannot read the {what} {path}: {exc}") from exc


def server_credentials(platform: PlatformSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate and key are configured; client certificates required when asked (mTLS)."""
    if platform.tls_cert_file is None and platform.tls_key_file is None:
        if platform.tls_require_client_cert:
            raise InvalidConfigurationError("tls_require_client_cert needs tls_cert_file and tls_key_file")
        return None
    if platform.tls_cert_file is None or platform.tls_key_file is None:
        raise InvalidConfigurationError("TLS needs both tls_cert_file and tls_key_file")
    pair = (_read(platform.tls_key_file, "TLS key"), _read(platform.tls_cert_file, "TLS certificate"))
    client_ca = _read(platform.tls_client_ca_file, "client CA") if platform.tls_client_ca_file else None
    if platform.tls_require_client_cert and client_ca is None:
        raise InvalidConfigurationError("tls_require_client_cert needs tls_client_ca_file")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=platform.tls_require_client_cert
    )


def channel_credentials(client: ClientSettings) -> grpc.ChannelCredentials | None:
    """TLS towards the servers when a CA bundle or a client certificate is configured; None for plaintext."""
    if client.ca_file is None and client.cert_file is None:
        return None
    if (client.cert_file is None) != (client.key_file is None):
        raise InvalidConfigurationError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(client.ca_file, "CA bundle") if client.ca_file else None,
        private_key=_read(client.key_file, "client key") if client.key_file else None,
        certificate_chain=_read(client.cert_file, "client certificate") if client.cert_file else None,
    )
