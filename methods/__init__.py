"""Every FL method is one module here; installed as ``fedbench.methods``, importing it registers them all."""
from fedbench.methods import fedavg, small  # noqa: F401
from fedbench.methods import fd, fedrolex, heterofl  # noqa: F401
from fedbench.methods import fedepth  # noqa: F401
from fedbench.methods import depthfl  # noqa: F401
from fedbench.methods import cocofl  # noqa: F401
from fedbench.methods import slt  # noqa: F401
from fedbench.methods import fedssl, fll_dd, lw_fedssl  # noqa: F401
from fedbench.methods import checkpointed, exclusive, grad_accum  # noqa: F401
from fedbench.methods import fjord  # noqa: F401
from fedbench.methods import fiarse  # noqa: F401
