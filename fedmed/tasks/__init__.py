"""Task registry: a task name in the config -> the model, loss and metrics that go with it.

A new task family is one module and one entry in TASKS; nothing else changes.
"""

from __future__ import annotations

from fedmed.errors import ConfigError
from fedmed.tasks.tabular import TabularClassification, Task

TASKS: dict[str, Task] = {
    "tabular-classification": TabularClassification(),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown task '{name}'; valid tasks: {', '.join(sorted(TASKS))}"
        ) from None
