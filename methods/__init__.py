"""Every FL method is one module here; importing this package registers them all."""
from methods import fedavg, small  # noqa: F401
from methods import fd, fedrolex, heterofl  # noqa: F401
from methods import fedepth  # noqa: F401
from methods import slt  # noqa: F401
from methods import fedssl, fll_dd, lw_fedssl  # noqa: F401
from methods import checkpointed, exclusive, grad_accum  # noqa: F401
