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
import sys

from fedmed import flower_compat

CERT_ENV = "FEDMED_OPERATOR_CERT"
KEY_ENV = "FEDMED_OPERATOR_KEY"


def main() -> None:
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if cert and key:
        flower_compat.present_client_certificate(cert, key)
    from flwr.cli.app import app

    sys.argv = ["flwr", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
