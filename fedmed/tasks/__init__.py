"""Task registry: a task name in the config -> the model, loss and metrics that go with it.

A new task family is one module and one entry in TASKS; nothing else changes.
"""

from __future__ import annotations

from torch import nn

from fedmed.config import RunConfig, SiteSpec
from fedmed.data import read_site_table, registry
from fedmed.data.arrays import ArrayTable
from fedmed.data.registry import Dataset
from fedmed.data.table import SiteData, SiteTable, prepare
from fedmed.data.text import TextTable, encode_table
from fedmed.errors import ConfigError
from fedmed.tasks.imaging import ImagingClassification
from fedmed.tasks.sequence import SequenceClassification
from fedmed.tasks.survival import Survival
from fedmed.tasks.tabular import TabularClassification, Task
from fedmed.tasks.text import TextClassification

TASKS: dict[str, Task] = {
    "tabular-classification": TabularClassification(),
    "survival": Survival(),
    "imaging-classification": ImagingClassification(),
    "sequence-classification": SequenceClassification(),
    "text-classification": TextClassification(),
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
    model = get_task(cfg.task).build_for(cfg)
    if cfg.privacy.enabled:
        from fedmed.tasks.dp_compat import make_compatible

        model = make_compatible(model)
    return model


def load_site_table(cfg: RunConfig, site: SiteSpec) -> SiteTable | ArrayTable | TextTable:
    """Read and validate one site's table (raw units, split into train/test).

    The study's task is checked against the config first (e.g. survival needs a time and an
    event column) and decides which columns are the outcome; every path that touches site data
    (preflight, sites, baselines) comes through here, so a bad combination fails before training.
    """
    task = get_task(cfg.task)
    if cfg.model.frozen_embedding and task.target != "text":  # no token table to freeze
        raise ConfigError(
            f"model.frozen_embedding fixes a text model's token table; task '{cfg.task}' has "
            "none: remove it (or set task = 'text-classification')"
        )
    task.check(cfg)
    return read_site_table(cfg, site, task.target)


def load_site_data(cfg: RunConfig, site: SiteSpec) -> SiteData:
    """Model-ready arrays for one site, preprocessing fitted on its own train split."""
    table = load_site_table(cfg, site)
    if isinstance(table, ArrayTable):
        return table.data
    if isinstance(table, TextTable):  # token ids need the study's vocabulary
        return encode_table(table, cfg.data.text)
    return prepare(table, cfg.data.schema)


def site_view(
    run: RunConfig, ds: Dataset, site: str, epsilon_cap: float | None = None
) -> tuple[RunConfig, SiteSpec]:
    """The study as this site runs it on its registered dataset (of the kind the task reads)."""
    return registry.site_view(run, ds, site, epsilon_cap, target=get_task(run.task).target)
