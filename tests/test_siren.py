"""The SIREN's standard initialisation and its activation statistics."""

import math

import pytest
import torch

from models.siren import SineLayer, Siren


def build(**overrides) -> Siren:
    torch.manual_seed(0)
    options = {"hidden_dim": 256, "n_layers": 4, "omega_0": 30.0} | overrides
    return Siren(in_features=3, out_features=2, **options)


def test_layers_and_output_shape():
    model = build(n_layers=3, hidden_dim=32)
    sines = [m for m in model.modules() if isinstance(m, SineLayer)]
    assert len(sines) == 3 and sines[0].is_first and not sines[1].is_first
    assert model(torch.zeros(7, 3)).shape == (7, 2)


@pytest.mark.parametrize("omega_0", [10.0, 30.0])
def test_weights_follow_the_siren_bounds(omega_0):
    model = build(omega_0=omega_0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    bounds = [1 / 3] + [math.sqrt(6 / 256) / omega_0] * (len(linears) - 1)
    for linear, bound in zip(linears, bounds, strict=True):
        weight = linear.weight.detach()
        assert weight.abs().max() <= bound
        # uniform on [-b, b] has std b / sqrt(3)
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_hidden_activations_are_arcsine_distributed():
    model = build()
    x = torch.rand(4096, 3) * 2 - 1
    with torch.no_grad():
        for layer in list(model.net)[:-1]:
            x = layer(x)
            if layer.is_first:
                continue  # the first layer's inputs are coordinates, not sines
            # sin of a wide normal: mean 0, std 1/sqrt(2), 29% of mass beyond |0.9|
            assert abs(x.mean().item()) < 0.05
            assert x.std().item() == pytest.approx(1 / math.sqrt(2), abs=0.05)
            assert (x.abs() > 0.9).float().mean().item() == pytest.approx(0.287, abs=0.05)


def test_learnable_omega_is_a_parameter_that_learns():
    fixed = build(learnable_omega=False, hidden_dim=8)
    learnable = build(learnable_omega=True, hidden_dim=8)
    assert not any(name.endswith("omega") for name, _ in fixed.named_parameters())
    omegas = [p for name, p in learnable.named_parameters() if name.endswith("omega")]
    assert len(omegas) == 4
    learnable(torch.rand(16, 3)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in omegas)
