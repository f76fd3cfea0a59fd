"""fedbench: resource-constrained federated-learning methods on one simulation engine."""
__version__ = "0.1.0"
