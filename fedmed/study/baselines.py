"""The two references every federated result needs, on the SAME per-site test sets.

- pooled: one model trained on the union of the sites' train splits (the upper reference a
  federation tries to reach; preprocessing fitted on the pooled train split);
- local: each site trains alone on its own rows (what a hospital gets without joining).
Both follow the study's schedule (rounds x local steps/epochs) and report per round, so their
curves sit next to the federated ones. No Flower here: nothing is exchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from fedmed.config import RunConfig
from fedmed.data.arrays import ArrayTable
from fedmed.data.table import Preprocessor, SiteData, prepare
from fedmed.data.text import TextTable, encode_table, shared_word_counts, with_vocabulary
from fedmed.privacy.accounting import Entry, epsilon_spent
from fedmed.privacy.dpsgd import train_private
from fedmed.study.history import RoundCallback, RunHistory
from fedmed.study.outputs import finish_run, live_reporter
from fedmed.study.plan import RunPlan, initial_model
from fedmed.study.statistics import with_series_reference
from fedmed.tasks import get_task, load_site_data, load_site_table
from fedmed.train import (
    derive_seed,
    evaluate,
    make_optimizer,
    mean_of_models,
    resolve_device,
    train_plain,
)


class _Trainer:
    """One model with its own privacy history, trained round by round."""

    def __init__(self, plan: RunPlan, name: str) -> None:
        self.cfg = plan.config
        self.name = name
        self.model = initial_model(plan)
        # Baselines are references, not site activity: their privacy history stays in memory
        # and never touches a site's ledger.
        self.history: list[Entry] = []
        self.task = get_task(self.cfg.task)
        self.device = resolve_device(self.cfg.device)
        # One model trained throughout: its optimizer (Adam's moments) carries across rounds,
        # so "10 rounds x 5 epochs" is the same training as "50 epochs".
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, self.cfg.train)
        # strategy.average_last, as a federated run applies it: evaluate and save the mean of
        # the last rounds' models while training continues from the latest.
        self.window: list[dict[str, np.ndarray]] = []
        self._released: torch.nn.Module | None = None

    def train_round(self, rnd: int, data: SiteData) -> dict[str, float]:
        seed = derive_seed(self.cfg.seed, rnd, self.name)
        this_round = self.cfg.replace(train=self.cfg.train.at_round(rnd))  # train.lr_decay
        for group in self.optimizer.param_groups:
            group["lr"] = this_round.train.lr
        if self.cfg.privacy.enabled:
            result, entries = train_private(
                self.model,
                data.x_train,
                data.y_train,
                self.task,
                this_round,
                seed=seed,
                device=self.device,
            )
            self.history += entries
            eps = epsilon_spent(self.history, self.cfg.privacy)
        else:
            result = train_plain(
                self.model,
                data.x_train,
                data.y_train,
                self.task,
                this_round.train,
                seed=seed,
                device=self.device,
                optimizer=self.optimizer,
            )
            eps = 0.0
        if self.cfg.strategy.average_last > 1:  # no copy of the model when nothing averages
            state = {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
            self.window = [*self.window, state][-self.cfg.strategy.average_last :]
            self._released = None
        return {
            "num-examples": result.num_examples,
            "train_loss": result.loss,
            "steps": result.steps,
            "epsilon": eps,
        }

    def released(self) -> torch.nn.Module:
        """The model this round reports and the run saves (the window's mean, if averaging)."""
        if len(self.window) < 2:
            return self.model
        if self._released is None:
            self._released = copy.deepcopy(self.model)
            mean = mean_of_models(self.window)
            self._released.load_state_dict({k: torch.from_numpy(v) for k, v in mean.items()})
        return self._released

    def evaluate(self, data: SiteData) -> dict[str, float]:
        metrics = evaluate(
            self.released(),
            data.x_test,
            data.y_test,
            self.task,
            self.device,
            train=(data.x_train, data.y_train),
            horizons=self.cfg.data.schema.horizons,
        )
        return {**metrics, "num-examples": len(data.y_test)}


def pooled_site_data(cfg: RunConfig) -> tuple[SiteData, list[SiteData]]:
    """The pooled train set and each site's arrays, all preprocessed with the pooled fit.

    Images and series (ArrayTable) keep each site's own preprocessing: images use a fixed
    transform anyway; a series site standardizes with its own train statistics, as it does
    when it federates, so pooled differs from federated only in how the model is trained
    (with data.series.standardize = "consortium", with the union's, as federated then does).
    """
    tables = [load_site_table(cfg, s) for s in cfg.sites]
    if isinstance(tables[0], TextTable):  # token ids from the study's one vocabulary
        per_site = [encode_table(t, cfg.data.text) for t in tables if isinstance(t, TextTable)]
        return _pooled(per_site, per_site[0].preprocessing), per_site
    if isinstance(tables[0], ArrayTable):
        per_site = [t.data for t in tables if isinstance(t, ArrayTable)]
        return _pooled(per_site, per_site[0].preprocessing), per_site
    schema = cfg.data.schema
    pooled_x = pd.concat([t.x_train for t in tables], ignore_index=True)
    pre = Preprocessor(tables[0].features, schema).fit(pooled_x)
    per_site = [prepare(t, schema, fitted=pre) for t in tables]  # type: ignore[arg-type]
    return _pooled(per_site, pre.to_dict()), per_site


def union_scale(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the union's series scale when it asks for a consortium one (else as is).

    A pooled run computes it from the sites' statistics exactly as a federated consortium study
    does before round 1, and records it in the run's config like the federated run does.
    """
    series = cfg.data.series
    if cfg.task != "sequence-classification" or series.standardize != "consortium" or series.mean:
        return cfg
    own = [load_site_data(cfg, s).preprocessing for s in cfg.sites]
    return with_series_reference(cfg, own)


def consortium_vocabulary(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the text vocabulary a federated study would build (else as is).

    Built exactly as before a federated round 1: from each site's words counted at least
    data.text.min_count times in its own train texts. Pooled and local runs use it too, so the
    three modes differ only in how the model is trained (a site alone would have only its own
    words; the shared vocabulary is what joining the consortium gives it).
    """
    if cfg.task != "text-classification" or cfg.data.text.vocabulary:
        return cfg
    tables = [load_site_table(cfg, s) for s in cfg.sites]
    counts = [
        shared_word_counts(t, cfg.data.text.min_count) for t in tables if isinstance(t, TextTable)
    ]
    return with_vocabulary(cfg, counts)


def _pooled(per_site: list[SiteData], preprocessing: dict) -> SiteData:
    """The union of the sites' train splits (no test rows: each site keeps its own)."""
    first = per_site[0]
    return SiteData(
        name="pooled",
        x_train=np.concatenate([d.x_train for d in per_site]),
        y_train=np.concatenate([d.y_train for d in per_site]),
        x_test=first.x_test[:0],
        y_test=first.y_test[:0],
        input_names=first.input_names,
        preprocessing=preprocessing,
    )


def run_pooled(plan: RunPlan, on_round: RoundCallback | None = None) -> dict:
    started = time.time()
    plan = replace(plan, config=consortium_vocabulary(union_scale(plan.config)))
    cfg = plan.config
    pooled, per_site = pooled_site_data(cfg)
    history = RunHistory(sites=cfg.site_names)
    report = live_reporter(plan, on_round)
    trainer = _Trainer(plan, "pooled")
    for rnd in range(1, cfg.rounds + 1):
        train_metrics = trainer.train_round(rnd, pooled)
        for data in per_site:
            history.record(rnd, "train", data.name, train_metrics)
            history.record(rnd, "evaluate", data.name, trainer.evaluate(data))
        report(rnd, history)
    return finish_run(plan, history, {"model": trainer.released()}, started)


def run_local(plan: RunPlan, on_round: RoundCallback | None = None) -> dict:
    started = time.time()
    plan = replace(plan, config=consortium_vocabulary(plan.config))
    cfg = plan.config
    sites = [load_site_data(cfg, s) for s in cfg.sites]
    trainers = {d.name: _Trainer(plan, d.name) for d in sites}
    history = RunHistory(sites=cfg.site_names)
    report = live_reporter(plan, on_round)
    for rnd in range(1, cfg.rounds + 1):
        for data in sites:
            trainer = trainers[data.name]
            history.record(rnd, "train", data.name, trainer.train_round(rnd, data))
            history.record(rnd, "evaluate", data.name, trainer.evaluate(data))
        report(rnd, history)
    models: dict[str, torch.nn.Module] = {f"model-{n}": t.released() for n, t in trainers.items()}
    return finish_run(plan, history, models, started)
