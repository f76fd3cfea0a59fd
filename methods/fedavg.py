"""FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629, Algorithm 1).

Every sampled client trains the full model with local SGD; the server takes the
sample-weighted mean. Clients whose budget is below 1 still train the full model, and
every client-round records whether it exceeded its budget: that is the point of the baseline.
"""
from fedbench.method import Method, register_method


@register_method
class FedAvg(Method):
    name = "fedavg"
    description = "full model on every client, sample-weighted averaging; budgets are recorded, not enforced"
    paper = "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data (arXiv 1602.05629)"
    trains_batched = True
