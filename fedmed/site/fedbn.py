"""FedBN: normalization layers that stay at each site (Li et al., ICLR 2021).

Hospitals differ in scanners and protocols, so the same anatomy reaches the network with
different intensity statistics. FedBN keeps each site's normalization layers (their affine
weight/bias and any running statistics) at the site and averages only the rest: every site
learns its own feature scaling on top of shared filters. Here the local layers are never sent:
the coordinator's strategies, update validation, central DP and checkpoints see only the shared
keys, and no extra release leaves the site (under DP-SGD the local layers are trained by the
same private step as the shared ones).

Which layers are "normalization" comes from the model's module types, never from key names.
A site keeps its local layers on its own disk, one small safetensors file per round
(``LocalLayerStore``), not only in Flower's ``Context.state``: that state belongs to one Flower
run, and a resumed study (``fedmed simulate --resume``) or a restarted site daemon starts a new
one. Flower-free: the ClientApp and the coordinator call this.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedmed.config import RunConfig, site_state_dir
from fedmed.errors import FedmedError
from fedmed.tasks.local_layers import local_keys, split

FILE = re.compile(r"^round-(\d{6})\.safetensors$")


def initial_local_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The normalization parameters of the study's round-0 model (the coordinator's seed).

    What a site starts from before its first round, and what the coordinator's (and the served)
    model holds, since the coordinator never receives a site's own.
    """
    from fedmed.tasks import build_model

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
    _, local = split(model.state_dict(), local_keys(model))
    return {k: v.clone() for k, v in local.items()}


def simulation_state_dir(run: RunConfig, study: str) -> Path:
    """Where simulated sites keep their state: $FEDMED_SITE_STATE_DIR, else the run's folder.

    A simulation's sites live and die with its run: RUN_DIR/sites/ keeps their layers next to
    the checkpoint that ``--resume`` reads, and nothing is left behind in the user's home.
    """
    override = site_state_dir()
    if override:
        return Path(override)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", study)[:128] or "unnamed"
    return Path(run.output_dir).resolve() / safe / "sites"


class LocalLayerStore:
    """One site's normalization parameters for one study: a safetensors file per round.

    Round r's training starts from the latest round before r and evaluation in round r uses the
    latest up to r, so a round the coordinator asks for again (after a crash and resume) starts
    from exactly what it started from the first time. Two rounds are kept; older files are
    deleted. The study id comes from the coordinator, so it is reduced to a safe folder name.
    """

    def __init__(self, root: Path, study: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", study)[:64]
        digest = hashlib.sha256(study.encode()).hexdigest()[:12]
        self.directory = Path(root) / f"{safe}-{digest}"

    def latest(self, up_to: int) -> dict[str, torch.Tensor] | None:
        """The parameters saved for the latest round <= ``up_to``; None before the first."""
        rounds = [r for r in self._rounds() if r <= up_to]
        if not rounds:
            return None
        return load_file(self._path(max(rounds)))

    def save(self, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
        """Write round ``server_round``'s parameters atomically; drop rounds before the last two."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(server_round)
        tmp = path.with_suffix(".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp), metadata={"round": str(server_round)})
        os.replace(tmp, path)
        for old in self._rounds():
            if old < server_round - 1:
                self._path(old).unlink(missing_ok=True)

    def _rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return [int(m.group(1)) for p in self.directory.iterdir() if (m := FILE.match(p.name))]

    def _path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:06d}.safetensors"


def site_model_state(
    shared: Mapping[str, torch.Tensor],
    local: Mapping[str, torch.Tensor],
    keys: frozenset[str],
) -> dict[str, torch.Tensor]:
    """The global shared arrays with this site's own normalization parameters.

    Refuses a shared part that carries local keys or a local part that is not the model's own
    set: either means the coordinator and the site disagree on what stays at the site.
    """
    leaked = sorted(set(shared) & keys)
    if leaked:
        raise FedmedError(
            f"the coordinator sent normalization parameters ({', '.join(leaked[:3])}) that this "
            "study keeps at the sites; coordinator and site run different fedmed versions"
        )
    if set(local) != keys:
        raise FedmedError(
            "this site's stored normalization parameters do not match the study's model; "
            "delete the study's folder in the site's local-layers state and start it again"
        )
    return {**shared, **local}
