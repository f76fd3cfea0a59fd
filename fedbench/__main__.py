"""``python -m fedbench`` (and ``torchrun -m fedbench``)."""
from fedbench.cli import main

main()
