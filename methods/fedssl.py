"""FedMoCoV3: end-to-end federated MoCo v3, the reference of LW-FedSSL (arXiv 2401.11647 v4, §4, Table 2).

Every client trains the whole encoder plus H and P with MoCo v3 (``methods._ssl``); the
server takes the sample-weighted mean. Its measured memory is budget 1 for the SSL methods.
"""
from __future__ import annotations

from fedbench.method import register_method
from fedbench.methods._ssl import SSLMethod


@register_method
class FedSSL(SSLMethod):
    name = "fedssl"
    description = "end-to-end federated MoCo v3 (FedMoCoV3): whole encoder + heads on every client"
    paper = "Tun et al. 2024/25, arXiv 2401.11647 v4, baseline FedMoCoV3 (MoCo v3: Chen et al. 2021, arXiv 2104.02057)"
