"""Every FL method is one module here; importing this package registers them all."""
from methods import fedavg, small  # noqa: F401
