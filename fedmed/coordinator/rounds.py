"""What every study's rounds share, whichever loop drives them.

The rounds get the strategy built from the config (central DP included), the recorder that
judges and records every site's reply, the true round numbers after a resume, and a checkpoint
(model, strategy state, round, history) after every round, written BEFORE the round is reported,
so a run killed at any point resumes from its last completed round. Plain rounds drive them with
Flower's Message API strategy loop (``Strategy.start``); SecAgg+ rounds with Flower's legacy
workflow, through an adapter onto this same stack (fedmed.coordinator.secure.LegacyAdapter).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord

from fedmed.coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmed.coordinator.strategies import (
    AVERAGE_STATE,
    AverageRounds,
    KeepDtypes,
    RoundOffset,
    SiteRecorder,
    UpdateValidator,
    build_strategy,
    restore_strategy_state,
    strategy_state,
)
from fedmed.privacy.accounting import central_epsilon
from fedmed.protocol import RUN_KEY, STUDY_KEY
from fedmed.study.history import RoundCallback, RunHistory
from fedmed.study.outputs import live_reporter
from fedmed.study.plan import RunPlan
from fedmed.tasks.local_layers import split

log = logging.getLogger("fedmed.coordinator")


class StudyRounds:
    """The strategy stack of a study's rounds, resumed from its checkpoint when the plan says so.

    ``strategy`` (outside in): true round numbers -> record what arrived -> judge it ->
    aggregate. ``done`` rounds were completed before a resume; ``history`` is the run's (the
    checkpoint's after a resume); ``initial_arrays`` what the next round starts from and
    ``study`` the config every instruction carries. ``model`` is loaded from the checkpoint on
    resume; ``kept`` are the keys the sites keep (FedBN).
    """

    def __init__(
        self,
        plan: RunPlan,
        model: torch.nn.Module,
        history: RunHistory,
        on_round: RoundCallback | None = None,
        kept: frozenset[str] = frozenset(),
    ) -> None:
        cfg = plan.config
        self.plan = plan
        base = build_strategy(cfg)
        done, window = 0, {}
        if plan.resume:
            checkpoint = load_checkpoint(plan.run_dir, cfg)
            done, history = checkpoint.round, checkpoint.history
            restored = {k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()}
            model.load_state_dict({**split(model.state_dict(), kept)[1], **restored})
            shared_keys = [k for k in model.state_dict() if k not in kept]
            saved = checkpoint.strategy_state
            window = {k: v for k, v in saved.items() if k.startswith(AVERAGE_STATE)}
            own = {k: v for k, v in saved.items() if k not in window}
            restore_strategy_state(base, own, shared_keys)
            log.info("resuming %s after round %d of %d", plan.run_dir, done, cfg.rounds)
        self.done, self.history, self.base = done, history, base
        # What every instruction carries: the plan (the sites check it) and the study's id.
        self.study = {RUN_KEY: cfg.to_json(), STUDY_KEY: plan.run_dir.name}
        self.initial_arrays = ArrayRecord(split(model.state_dict(), kept)[0])
        self.report = live_reporter(plan, on_round)

        strategy = KeepDtypes(base)
        if cfg.strategy.validate_updates:
            strategy = UpdateValidator(
                strategy,
                history,
                max_norm_ratio=cfg.strategy.max_norm_ratio,
                min_sites=cfg.strategy.min_sites or len(cfg.sites),
            )
        self.averager = None
        if cfg.strategy.average_last > 1:  # sites train from the latest model; evaluation: mean
            strategy = self.averager = AverageRounds(strategy, cfg.strategy.average_last)
            self.averager.restore(window)
        # Flower's legacy SecAgg+ workflow hands over failures without their node: the adapter
        # in coordinator.secure names the sites that did not answer there.
        self.recorder = SiteRecorder(
            strategy,
            history,
            on_round=self.round_done,
            name_missing=not cfg.strategy.secure_aggregation,
        )
        self.strategy = RoundOffset(self.recorder, done)

    def round_done(self, rnd: int) -> None:
        """Central ε so far, the checkpoint, then the live report (in that order)."""
        cfg = self.plan.config
        if cfg.privacy.central != "off":
            self.history.central_epsilon[rnd] = central_epsilon(cfg, rnd)
        arrays = self.recorder.global_arrays
        assert arrays is not None  # set by configure_evaluate, which precedes this callback
        state = {k: arrays[k].numpy() for k in arrays}
        window = self.averager.state() if self.averager else {}
        cross_round = {**strategy_state(self.base), **window}
        save_checkpoint(self.plan.run_dir, cfg, Checkpoint(rnd, state, self.history, cross_round))
        self.report(rnd, self.history)

    def release(self, model: torch.nn.Module) -> None:
        """Load the global model the last round evaluated (with average_last: the window's
        mean) into ``model``; a run that ran no round keeps the model it started from."""
        arrays = self.recorder.global_arrays
        if self.averager is not None and self.averager.models:
            arrays = self.averager.averaged()
        if arrays is not None:
            model.load_state_dict({**model.state_dict(), **arrays.to_torch_state_dict()})
