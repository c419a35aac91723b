"""SIREN: a multilayer perceptron with sine activations (Sitzmann et al. 2020).

EDITABLE by the agent. The harness builds `Siren(in_features=3, out_features=C,
hidden_dim=..., n_layers=..., omega_0=..., learnable_omega=...)` and calls `model(coords)`
on (points, 3) inputs in [-1, 1]; keep that signature.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SineLayer(nn.Module):
    """sin(omega * (W x + b)), initialised so activations stay well spread through depth."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        omega_0: float = 30.0,
        is_first: bool = False,
        learnable_omega: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.is_first = is_first
        self.linear = nn.Linear(in_features, out_features)
        omega = torch.tensor(float(omega_0))
        if learnable_omega:
            self.omega = nn.Parameter(omega)
        else:
            self.register_buffer("omega", omega)
        self.init_weights(omega_0)

    def init_weights(self, omega_0: float) -> None:
        with torch.no_grad():
            if self.is_first:
                bound = 1.0 / self.in_features
            else:
                bound = math.sqrt(6.0 / self.in_features) / omega_0
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega * self.linear(x))


class Siren(nn.Module):
    """`n_layers` sine layers of width `hidden_dim`, then a linear output layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dim: int = 64,
        n_layers: int = 3,
        omega_0: float = 30.0,
        learnable_omega: bool = False,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential()
        self.net.append(
            SineLayer(
                in_features, hidden_dim, omega_0, is_first=True, learnable_omega=learnable_omega
            )
        )
        for _ in range(n_layers - 1):
            self.net.append(
                SineLayer(hidden_dim, hidden_dim, omega_0, learnable_omega=learnable_omega)
            )
        final_linear = nn.Linear(hidden_dim, out_features)
        with torch.no_grad():
            bound = math.sqrt(6.0 / hidden_dim) / omega_0
            final_linear.weight.uniform_(-bound, bound)
        self.net.append(final_linear)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.net(coords)
