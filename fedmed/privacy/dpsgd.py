"""DP-SGD mechanics (Opacus): one private local round."""

from __future__ import annotations

import numpy as np
from torch import nn

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.privacy.accounting import Entry, merge_history, plan_for_site
from fedmed.tasks.tabular import Task
from fedmed.train import TrainResult, make_loader, make_optimizer, run_steps


def train_private(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    cfg: RunConfig,
    *,
    seed: int,
    device: object,
    proximal_mu: float = 0.0,
) -> tuple[TrainResult, list[Entry]]:
    """One round of DP-SGD; returns the result and the accountant entries of THIS round.

    The caller appends the entries to the site's ledger (or history) and computes ε from all of
    them: a per-round engine's own accountant would forget earlier rounds.

    ``model`` is trained in place through Opacus' wrapper; callers keep exchanging the ORIGINAL
    module's state_dict (the wrapper's keys carry a ``_module.`` prefix).
    """
    import torch
    from opacus import PrivacyEngine

    task.check(cfg)  # e.g. survival refuses DP-SGD: its loss is not per-patient
    plan = plan_for_site(len(y), cfg)
    torch.manual_seed(seed)
    model.to(device).train()
    engine = PrivacyEngine(accountant=cfg.privacy.accountant)
    dp_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, cfg.train),
        data_loader=make_loader(x, y, cfg.train.batch_size, seed),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )
    try:
        loss = run_steps(
            dp_model, optimizer, loader, task, plan.steps_per_round, device, proximal_mu
        )
    except RuntimeError as exc:
        if "Batch size must be positive" in str(exc):  # expanded weights on an empty batch
            raise ConfigError(
                "privacy.grad_sample_mode='ew' cannot take the empty batches Poisson sampling "
                "draws at small sites or small batch sizes; use 'hooks'"
            ) from None
        raise
    finally:
        dp_model._close()  # drop Opacus' hooks from the original module
    entries = merge_history(list(engine.accountant.history))
    return TrainResult(loss=loss, steps=plan.steps_per_round, num_examples=len(y)), entries
