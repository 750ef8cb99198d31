"""Flower's Ray simulation engine: each site's ClientApp runs in a Ray actor process.

Flower's ``run_simulation`` hands the ServerApp an empty run_config, so the plan is bound into the
ServerApp object instead (see server_app.build_server_app); sites get the plan in every message.
"""

from __future__ import annotations

import logging
import os
import warnings

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def run_ray(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    cpus_per_site: float = 1.0,
    verbose: bool = False,
) -> None:
    """Run on Ray with ``num_nodes`` virtual SuperNodes; Ray is shut down afterwards."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's future default (leave CUDA_VISIBLE_DEVICES alone for CPU-only actors); opting in now
    # also silences its FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import torch
    from flwr.simulation import run_simulation

    # Sites share a visible GPU; without this Ray hides it from the actors.
    gpus = 1.0 / num_nodes if torch.cuda.is_available() else 0.0
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus},
        "init_args": {"log_to_driver": verbose, "logging_level": logging.ERROR},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_nodes,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
