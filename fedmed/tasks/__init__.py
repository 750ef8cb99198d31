"""Task registry: a task name in the config -> the model, loss and metrics that go with it.

A new task family is one module and one entry in TASKS; nothing else changes.
"""

from __future__ import annotations

from torch import nn

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.tasks.imaging import ImagingClassification
from fedmed.tasks.sequence import SequenceClassification
from fedmed.tasks.survival import Survival
from fedmed.tasks.tabular import TabularClassification, Task

TASKS: dict[str, Task] = {
    "tabular-classification": TabularClassification(),
    "survival": Survival(),
    "imaging-classification": ImagingClassification(),
    "sequence-classification": SequenceClassification(),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown task '{name}'; valid tasks: {', '.join(sorted(TASKS))}"
        ) from None


def build_model(cfg: RunConfig) -> nn.Module:
    """The study's model, identical at the coordinator and every site (DP-compatible if private)."""
    from fedmed.data.table import input_names

    model = get_task(cfg.task).build_model(
        len(input_names(cfg.data.schema.features, cfg.data.schema)), cfg.model
    )
    if cfg.privacy.enabled:
        from fedmed.privacy import make_compatible

        model = make_compatible(model)
    return model
