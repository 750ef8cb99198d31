"""Deployed app path kept for coordinators and sites on other fedmed versions (see README).

An assignment, not a bare re-export: Flower's `flwr run` looks for ``app = ...`` in this file's
syntax tree before it imports anything.
"""

from fedmed.coordinator import app as _coordinator

app = _coordinator.app
