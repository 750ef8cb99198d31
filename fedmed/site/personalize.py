"""Personalization: each site fine-tunes the final global model on its own train split.

A federated model is a compromise between hospitals; a few local epochs often fit one hospital's
case mix better. The fine-tuned model stays at the site; what leaves is its test metrics before
and after, so the coordinator can report whether personalization helped each site. Flower-free:
the ClientApp calls this, and so could a site's own tooling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from fedmed.config import RunConfig, TrainConfig
from fedmed.data.table import SiteData
from fedmed.tasks import get_task
from fedmed.train import derive_seed, evaluate, train_plain


def finetune_config(run: RunConfig) -> TrainConfig:
    """The study's local training settings with personalization's epochs (and lr, if set)."""
    p = run.personalize
    return replace(
        run.train, local_epochs=p.local_epochs, local_steps=None, lr=p.lr or run.train.lr
    )


def personalize(
    model: torch.nn.Module,
    data: SiteData,
    run: RunConfig,
    site: str,
    device: torch.device,
    local_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Test metrics of the global ``model`` before and after making it the site's own.

    ``local_state`` (FedBN: the site's own normalization layers) replaces those entries first;
    then, if personalize.local_epochs is set, the model is fine-tuned on the train split.
    """
    task = get_task(run.task)
    site_split = {"train": (data.x_train, data.y_train), "horizons": run.data.schema.horizons}
    before = evaluate(model, data.x_test, data.y_test, task, device, **site_split)
    if local_state is not None:
        model.load_state_dict({**model.state_dict(), **local_state})
    if run.personalize.local_epochs:
        train_plain(
            model,
            data.x_train,
            data.y_train,
            task,
            finetune_config(run),
            seed=derive_seed(run.seed, "personalize", site),
            device=device,
        )
    after = evaluate(model, data.x_test, data.y_test, task, device, **site_split)
    return {"before": before, "after": after}
