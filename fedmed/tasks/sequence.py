"""Binary classification of per-patient time series (e.g. ICU mortality) with a GRU.

Input per patient: (bins, 3 x variables) from fedmed.data.series (values carried forward,
observation masks, time since last observation). A GRU reads the bins in order; its last
state goes through dropout to one logit. Loss and metrics are the tabular classifier's.

Under DP-SGD the GRU must be Opacus' DPGRU: nn.GRU's fused kernel hides the per-example
activations Opacus needs. ``build_model`` builds a plain nn.GRU (fast) and
fedmed.tasks.build_model swaps it for a DPGRU when privacy is enabled (ModuleValidator.fix), so
private studies and their saved models use DPGRU throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmed.config import ModelConfig, RunConfig
from fedmed.errors import ConfigError
from fedmed.tasks.tabular import TabularClassification

INPUTS_PER_VARIABLE = 3  # value, mask, delta (fedmed.data.series.CHANNELS)


class SeriesGRU(nn.Module):
    """GRU over time bins -> last state -> dropout -> logit."""

    def __init__(self, n_variables: int, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden[0] if cfg.hidden else 32
        self.gru = nn.GRU(INPUTS_PER_VARIABLE * n_variables, hidden, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(self.dropout(out[:, -1]))


class SequenceClassification(TabularClassification):
    name = "sequence-classification"
    target = "series"

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.kind != "gru":
            raise ConfigError(
                f"task 'sequence-classification' trains a GRU; set model.kind = 'gru' (got "
                f"'{cfg.model.kind}') and model.hidden = [state size], e.g. [64]"
            )
        series = cfg.data.series
        if series.bin_minutes <= 0 or series.hours <= 0:
            raise ConfigError("data.series.hours and data.series.bin_minutes must be > 0")

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module:
        return SeriesGRU(n_inputs, cfg)
