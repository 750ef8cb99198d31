"""fedmed: federated learning for hospitals, on Flower, with differential privacy."""

__version__ = "0.1.0"
