"""2-D MLS-MPM (moving least squares material point method) in PyTorch. Trusted code.

Discs of liquid, jelly and snow fall under gravity in the unit box. Quadratic B-spline
transfers with APIC (affine velocity C), vectorised over particles: particle-to-grid is one
`index_add_` on the flattened grid, grid-to-particle one gather. Runs on CPU or CUDA; the
state is float64 (the dataset stores float32) and a CPU run is deterministic for a seed.

Materials:
- liquid: no shear (mu = 0); F is reset to sqrt(J)·I, keeping its volume ratio J, and Jp
  records that volume ratio, so Jp varies with the pressure in the liquid.
- jelly: purely elastic (fixed-corotated); Jp stays exactly 1.
- snow: singular values of F clamped to [1 - theta_c, 1 + theta_s]; the removed part goes
  into Jp, which hardens the material (h = exp(xi (1 - Jp))).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Material = Literal["liquid", "jelly", "snow"]
MATERIAL_IDS: dict[str, int] = {"liquid": 0, "jelly": 1, "snow": 2}
LIQUID, JELLY, SNOW = 0, 1, 2

SNOW_COMPRESSION = 2.5e-2  # theta_c: singular values may shrink to 1 - theta_c
SNOW_STRETCH = 4.5e-3  # theta_s: and grow to 1 + theta_s
HARDENING = 10.0  # xi in h = exp(xi * (1 - Jp))
JELLY_SOFTNESS = 0.3  # jelly uses 0.3 x the Lamé parameters (a softer solid)
BOUNDARY_CELLS = 3  # grid nodes this close to a wall get the wall's condition
DENSITY = 1.0

# The 9 grid offsets of the quadratic B-spline stencil, as (i, j) pairs.
_STENCIL = [(i, j) for i in range(3) for j in range(3)]


@dataclass(frozen=True)
class Disc:
    """One disc of particles at the start of the simulation (box coordinates in [0, 1])."""

    material: Material
    center: tuple[float, float]
    radius: float
    velocity: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class MPMParams:
    """Everything a simulation depends on; equal params and seed give equal CPU results."""

    discs: tuple[Disc, ...]
    particles_per_disc: int
    n_grid: int = 64
    dt: float = 1e-4
    substeps_per_frame: int = 40
    n_frames: int = 48
    gravity: float = 20.0
    youngs_modulus: float = 1000.0
    poisson_ratio: float = 0.2
    seed: int = 0


@dataclass
class Frames:
    """Stored frames, float32 numpy. Shapes: T frames, N particles; 2x2 matrices row-major."""

    position: np.ndarray  # (T, N, 2)
    velocity: np.ndarray  # (T, N, 2)
    C: np.ndarray  # (T, N, 4) affine velocity field
    F: np.ndarray  # (T, N, 4) deformation gradient
    Jp: np.ndarray  # (T, N) plastic volume ratio
    S: np.ndarray  # (T, N, 4) Kirchhoff stress
    material: np.ndarray  # (N,) int64 material id (see MATERIAL_IDS)
    mass: np.ndarray  # (N,)
    time: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (T,) seconds


@dataclass
class State:
    """The particle state during a simulation (torch tensors on one device)."""

    x: torch.Tensor  # (N, 2)
    v: torch.Tensor  # (N, 2)
    C: torch.Tensor  # (N, 2, 2)
    F: torch.Tensor  # (N, 2, 2)
    Jp: torch.Tensor  # (N,)
    material: torch.Tensor  # (N,) long
    mass: torch.Tensor  # (N,)
    volume: torch.Tensor  # (N,)


def lame_parameters(youngs_modulus: float, poisson_ratio: float) -> tuple[float, float]:
    """(mu, lambda) from Young's modulus and Poisson's ratio."""
    mu = youngs_modulus / (2 * (1 + poisson_ratio))
    la = youngs_modulus * poisson_ratio / ((1 + poisson_ratio) * (1 - 2 * poisson_ratio))
    return mu, la


def svd2(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form SVD of a batch of 2x2 matrices: F = U @ diag(sig) @ Vt, U and Vt rotations.

    The second singular value is negative for an inverted F (det < 0). Much faster than a
    batched LAPACK call for 2x2, and the same code on every device."""
    a, b, c, d = F[:, 0, 0], F[:, 0, 1], F[:, 1, 0], F[:, 1, 1]
    e, f, g, h = (a + d) / 2, (a - d) / 2, (c + b) / 2, (c - b) / 2
    q = torch.sqrt(e * e + h * h)
    r = torch.sqrt(f * f + g * g)
    sig = torch.stack([q + r, q - r], dim=-1)
    a1, a2 = torch.atan2(g, f), torch.atan2(h, e)
    return _rotation((a2 + a1) / 2), sig, _rotation((a2 - a1) / 2)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def initial_state(params: MPMParams, device: str | torch.device = "cpu") -> State:
    """Particles sampled uniformly in each disc with a numpy generator seeded by params.seed."""
    rng = np.random.default_rng(params.seed)
    n = params.particles_per_disc
    positions, velocities, materials, volumes = [], [], [], []
    for disc in params.discs:
        # sqrt of a uniform radius fraction gives a uniform density over the disc's area
        radius = disc.radius * np.sqrt(rng.random(n))
        angle = 2 * np.pi * rng.random(n)
        offsets = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        positions.append(np.asarray(disc.center) + offsets)
        velocities.append(np.broadcast_to(np.asarray(disc.velocity, dtype=np.float64), (n, 2)))
        materials.append(np.full(n, MATERIAL_IDS[disc.material], dtype=np.int64))
        volumes.append(np.full(n, math.pi * disc.radius**2 / n))
    as64 = {"dtype": torch.float64, "device": device}
    x = torch.tensor(np.concatenate(positions), **as64)
    total = x.shape[0]
    volume = torch.tensor(np.concatenate(volumes), **as64)
    return State(
        x=x,
        v=torch.tensor(np.concatenate(velocities), **as64),
        C=torch.zeros(total, 2, 2, **as64),
        F=torch.eye(2, **as64).repeat(total, 1, 1),
        Jp=torch.ones(total, **as64),
        material=torch.tensor(np.concatenate(materials), device=device),
        mass=volume * DENSITY,
        volume=volume,
    )


def _lame_per_particle(state: State, mu0: float, la0: float) -> tuple[torch.Tensor, torch.Tensor]:
    hardening = torch.exp(HARDENING * (1.0 - state.Jp)).clamp(0.1, 5.0)
    hardening = torch.where(state.material == JELLY, JELLY_SOFTNESS, hardening)
    # the liquid's Jp only records its volume ratio; it does not harden the liquid
    hardening = torch.where(state.material == LIQUID, 1.0, hardening)
    mu = torch.where(state.material == LIQUID, 0.0, mu0 * hardening)
    return mu, la0 * hardening


def _stress_from_svd(
    state: State, U: torch.Tensor, sig: torch.Tensor, Vt: torch.Tensor, mu0: float, la0: float
) -> torch.Tensor:
    mu, la = _lame_per_particle(state, mu0, la0)
    J = sig[:, 0] * sig[:, 1]
    shear = 2 * mu[:, None, None] * (state.F - U @ Vt) @ state.F.transpose(1, 2)
    pressure = la * J * (J - 1)
    shear[:, 0, 0] += pressure
    shear[:, 1, 1] += pressure
    return shear


def kirchhoff_stress(state: State, mu0: float, la0: float) -> torch.Tensor:
    """Fixed-corotated Kirchhoff stress 2 mu (F - R) F^T + lambda J (J - 1) I, shape (N, 2, 2)."""
    U, sig, Vt = svd2(state.F)
    return _stress_from_svd(state, U, sig, Vt, mu0, la0)


def _project_plasticity(state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Snow: clamp singular values into Jp; liquid: F <- sqrt(J) I with Jp = J.

    Returns the SVD of the projected F (the liquid's rotations do not matter: mu = 0)."""
    U, sig, Vt = svd2(state.F)
    snow = state.material == SNOW
    liquid = state.material == LIQUID
    clamped = sig.clamp(1 - SNOW_COMPRESSION, 1 + SNOW_STRETCH)
    new_sig = torch.where(snow[:, None], clamped, sig)
    J = new_sig[:, 0] * new_sig[:, 1]
    state.Jp = torch.where(snow, state.Jp * (sig[:, 0] * sig[:, 1]) / J, state.Jp)
    root_J = torch.sqrt(J.clamp_min(1e-6))
    eye = torch.eye(2, dtype=state.F.dtype, device=state.F.device)
    state.F = torch.where(snow[:, None, None], U @ torch.diag_embed(new_sig) @ Vt, state.F)
    state.F = torch.where(liquid[:, None, None], root_J[:, None, None] * eye, state.F)
    new_sig = torch.where(liquid[:, None], root_J[:, None].expand(-1, 2), new_sig)
    # a liquid has no shape memory: its whole volume change is "plastic"
    state.Jp = torch.where(liquid, J, state.Jp)
    # jelly is purely elastic: its Jp is exactly 1, whatever rounding did above
    state.Jp = torch.where(state.material == JELLY, 1.0, state.Jp)
    return U, new_sig, Vt


@dataclass(frozen=True)
class Stencil:
    """The 3x3 B-spline stencil of every particle: flat grid indices (N, 9), weights (N, 9)
    and node-minus-particle offsets in grid units (N, 9, 2)."""

    flat: torch.Tensor
    weights: torch.Tensor
    dpos: torch.Tensor


def stencil(x: torch.Tensor, n_grid: int) -> Stencil:
    """Quadratic B-spline weights of the 9 grid nodes around each particle."""
    scaled = x * n_grid
    base = torch.floor(scaled - 0.5)
    fx = scaled - base  # in [0.5, 1.5)
    w = torch.stack([0.5 * (1.5 - fx) ** 2, 0.75 - (fx - 1) ** 2, 0.5 * (fx - 0.5) ** 2], dim=1)
    weights = (w[:, :, None, 0] * w[:, None, :, 1]).reshape(-1, 9)
    offsets = torch.tensor(_STENCIL, dtype=x.dtype, device=x.device)
    flat_offsets = offsets[:, 0].long() * n_grid + offsets[:, 1].long()
    base = base.long()
    flat = (base[:, 0] * n_grid + base[:, 1])[:, None] + flat_offsets[None, :]
    return Stencil(flat=flat, weights=weights, dpos=offsets[None, :, :] - fx[:, None, :])


def particle_to_grid(
    state: State, params: MPMParams, stress: torch.Tensor, near: Stencil
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter mass and APIC momentum (with the stress impulse) to the grid.

    Returns grid mass (G,) and momentum (G, 2) for G = n_grid**2 nodes, flattened."""
    n = params.n_grid
    # MLS-MPM: the stress enters as an extra affine term next to the APIC matrix m C
    affine = -params.dt * 4 * n * n * state.volume[:, None, None] * stress
    affine = affine + state.mass[:, None, None] * state.C
    # dpos is in grid units: one more 1/n turns it into box units for affine @ dpos
    momentum = (
        state.mass[:, None, None] * state.v[:, None, :] + (near.dpos @ affine.transpose(1, 2)) / n
    )
    grid_mass = torch.zeros(n * n, dtype=state.x.dtype, device=state.x.device)
    grid_momentum = torch.zeros(n * n, 2, dtype=state.x.dtype, device=state.x.device)
    index = near.flat.reshape(-1)
    grid_mass.index_add_(0, index, (near.weights * state.mass[:, None]).reshape(-1))
    grid_momentum.index_add_(0, index, (near.weights[..., None] * momentum).reshape(-1, 2))
    return grid_mass, grid_momentum


def grid_update(
    grid_mass: torch.Tensor, grid_momentum: torch.Tensor, params: MPMParams
) -> torch.Tensor:
    """Grid velocities with gravity and slip walls (no velocity into a wall), shape (G, 2)."""
    occupied = grid_mass > 0
    velocity = grid_momentum / grid_mass.clamp_min(1e-30)[:, None]
    velocity[:, 1] -= params.dt * params.gravity
    velocity = torch.where(occupied[:, None], velocity, 0.0)
    low, high = _walls(params.n_grid, velocity.device)
    velocity = torch.where(low & (velocity < 0), 0.0, velocity)
    return torch.where(high & (velocity > 0), 0.0, velocity)


@functools.lru_cache(maxsize=8)
def _walls(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, 2) masks of nodes near the low and high wall of each axis."""
    coords = torch.arange(n, device=device)
    node = torch.stack([coords.repeat_interleave(n), coords.repeat(n)], dim=1)
    return node < BOUNDARY_CELLS, node > n - BOUNDARY_CELLS


def grid_to_particle(
    state: State, grid_velocity: torch.Tensor, params: MPMParams, near: Stencil
) -> None:
    """Gather velocity and the APIC matrix C from the grid, then advect particles."""
    n = params.n_grid
    weighted = near.weights[..., None] * grid_velocity[near.flat]  # (N, 9, 2)
    state.v = weighted.sum(dim=1)
    state.C = 4 * n * weighted.transpose(1, 2) @ near.dpos
    state.x = state.x + params.dt * state.v
    # safety net only: the wall condition keeps particles far from the grid's last nodes
    state.x = state.x.clamp(1.0 / n, 1.0 - 2.0 / n)


def substep(state: State, params: MPMParams, mu0: float, la0: float) -> None:
    """One MLS-MPM step: deform, project plasticity, P2G, grid update, G2P."""
    state.F = state.F + params.dt * state.C @ state.F
    U, sig, Vt = _project_plasticity(state)
    stress = _stress_from_svd(state, U, sig, Vt, mu0, la0)
    near = stencil(state.x, params.n_grid)
    grid_mass, grid_momentum = particle_to_grid(state, params, stress, near)
    grid_velocity = grid_update(grid_mass, grid_momentum, params)
    grid_to_particle(state, grid_velocity, params, near)


def simulate(
    params: MPMParams,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Frames:
    """Run the simulation and return params.n_frames stored frames (frame 0 = initial state);
    `progress(frame, n_frames)` after each stored frame."""
    mu0, la0 = lame_parameters(params.youngs_modulus, params.poisson_ratio)
    state = initial_state(params, device)
    records: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "v", "C", "F", "Jp", "S")}

    def record() -> None:
        stress = kirchhoff_stress(state, mu0, la0)
        for key, value in (
            ("x", state.x),
            ("v", state.v),
            ("C", state.C.reshape(-1, 4)),
            ("F", state.F.reshape(-1, 4)),
            ("Jp", state.Jp),
            ("S", stress.reshape(-1, 4)),
        ):
            records[key].append(value.detach().to("cpu", torch.float32).numpy())

    with torch.no_grad():
        record()
        for frame in range(1, params.n_frames):
            for _ in range(params.substeps_per_frame):
                substep(state, params, mu0, la0)
            record()
            if progress is not None:
                progress(frame + 1, params.n_frames)
    return Frames(
        position=np.stack(records["x"]),
        velocity=np.stack(records["v"]),
        C=np.stack(records["C"]),
        F=np.stack(records["F"]),
        Jp=np.stack(records["Jp"]),
        S=np.stack(records["S"]),
        material=state.material.cpu().numpy().astype(np.int64),
        mass=state.mass.to("cpu", torch.float32).numpy(),
        time=np.arange(params.n_frames, dtype=np.float32) * params.dt * params.substeps_per_frame,
    )
