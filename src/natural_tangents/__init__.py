"""natural-tangents: natural gradient descent with approximate Fisher information in wide networks.

import natural_tangents as nat
net = nat.MLP([784, 4096, 4096, 1], activation="relu")
theta = nat.empirical_ntk(net, x)                      # J J^T, no 1/N
step = nat.fisher.BlockDiagonal().natural_gradient(net, x, y)
"""

from . import activations, data, distributed, dynamics, fisher, layers, linalg, losses, models, theory
from .empirical import empirical_ntk, empirical_unit_ntk
from .network import MLP
from .optim import NGD
from .signals import Signals
from .training import GD, History, optimal_lr, train

__version__ = "0.1.0"

__all__ = [
    "GD",
    "MLP",
    "NGD",
    "Signals",
    "layers",
    "linalg",
    "distributed",
    "History",
    "fisher",
    "losses",
    "optimal_lr",
    "theory",
    "train",
    "activations",
    "data",
    "dynamics",
    "models",
    "empirical_ntk",
    "empirical_unit_ntk",
]
