"""Flower's ``flwr`` command, presenting a consortium operator's client certificate.

The coordinator's gate (fedmed.runtime.gate) lets only operators reach Flower's Control API,
by mutual TLS. Flower 1.41's CLI can verify the server but cannot present a client certificate,
so fedmed runs Flower's own CLI with one change: the TLS context it builds also carries the
operator's certificate and key (``FEDMED_OPERATOR_CERT`` / ``FEDMED_OPERATOR_KEY``, set by
fedmed.runtime.deployment.flwr_cli from ``--operator DIR``). Everything else is Flower's.

Not a user command: ``python -m fedmed.runtime.operator_cli <flwr arguments>``.
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any

CERT_ENV = "FEDMED_OPERATOR_CERT"
KEY_ENV = "FEDMED_OPERATOR_KEY"


def with_client_certificate(cert: str, key: str) -> None:
    """Make every Control API client Flower's CLI creates present ``cert``."""
    from flwr.cli import utils as cli_utils

    client_cls = cli_utils.ControlHttpClient

    def from_server_address(
        cls: Any,
        server_address: str,
        insecure: bool,
        root_certificates: bytes | str | None,
        interceptors: Any,
        *,
        retry_invoker: Any = None,
    ) -> Any:
        if insecure:
            raise SystemExit("fedmed: an operator connection needs TLS (the gate's certificate)")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if isinstance(root_certificates, bytes):
            context.load_verify_locations(cadata=root_certificates.decode("ascii"))
        elif isinstance(root_certificates, str):
            context.load_verify_locations(cafile=root_certificates)
        context.load_cert_chain(cert, key)
        return cls(
            f"https://{server_address}",
            interceptors=interceptors,
            verify=context,
            retry_invoker=retry_invoker,
        )

    client_cls.from_server_address = classmethod(from_server_address)  # type: ignore[method-assign]


def main() -> None:
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if cert and key:
        with_client_certificate(cert, key)
    from flwr.cli.app import app

    sys.argv = ["flwr", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
