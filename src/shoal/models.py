"""Reference models: logistic regression, the 2NN MLP and a small CNN.

* ``logreg`` -- multinomial logistic regression (the FedProx paper's ``mclr``).
* ``mlp2nn`` -- the "2NN" of McMahan et al. (AISTATS 2017, "Communication-Efficient Learning
  of Deep Networks from Decentralized Data"): 784-200-200-10 with ReLU, 199,210 parameters.
* ``cnn`` -- NIID-Bench's ``simple-cnn`` for 28x28 inputs (Li et al., ICDE 2022, "Federated
  Learning on Non-IID Data Silos: An Experimental Study"): conv(1->6,5)-pool-conv(6->16,5)-pool-
  FC 256-120-84-10, 44,426 parameters.

Every model is built right after ``torch.manual_seed(seed)`` so a seed names one
initialisation, the same one a bare PyTorch script gets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shoal.errors import ConfigError

__all__ = ["MODELS", "build_model", "is_mlp"]


def logreg(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def mlp2nn(in_features: int, num_classes: int, hidden: int = 200) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class SimpleCNN(nn.Module):
    """NIID-Bench ``simple-cnn`` for single-channel 28x28 images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28)
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def cnn(in_features: int, num_classes: int) -> nn.Module:
    if in_features != 784:
        raise ConfigError(f"model 'cnn' needs 28x28 single-channel inputs (784 features), "
                          f"the dataset has {in_features}", key="model.name")
    return SimpleCNN(num_classes)


#: name -> builder(in_features, num_classes)
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "logreg": logreg,
    "mlp2nn": mlp2nn,
    "cnn": cnn,
}


def build_model(name: str, in_features: int, num_classes: int, seed: int) -> nn.Module:
    """Build a reference model, initialised right after ``torch.manual_seed(seed)``.

    Raises:
        ConfigError: unknown model name.
    """
    try:
        builder = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}",
                          key="model.name") from None
    torch.manual_seed(seed)
    return builder(in_features, num_classes)


def is_mlp(module: nn.Module) -> bool:
    """True for an ``nn.Sequential`` of Flatten, Linear and ReLU layers ending in a Linear.

    Such models train with shoal's fused batched-matmul kernel; others use ``torch.func``.
    """
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return False
    layers = [m for m in module if not isinstance(m, nn.Flatten)]
    if not layers or not isinstance(layers[-1], nn.Linear):
        return False
    if any(not isinstance(m, (nn.Linear, nn.ReLU)) for m in layers):
        return False
    if any(isinstance(m, nn.Linear) and m.bias is None for m in layers):
        return False
    # Flatten may only lead; two Linears in a row are allowed, two ReLUs are harmless.
    return all(not isinstance(m, nn.Flatten) for m in list(module)[1:])
