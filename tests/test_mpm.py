"""The MPM simulation's physics sanity and the dataset cache (small scenes, seconds)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models import mpm
from models.data import cache_path, field_samples, load_frames, scene
from models.settings import SimulationSettings

ROOT = Path(__file__).resolve().parents[1]


def small_params(seed: int = 0, n_frames: int = 6) -> mpm.MPMParams:
    """Three 150-particle discs dropped fast onto the floor of a 32-cell grid."""
    discs = tuple(
        mpm.Disc(material, (x, 0.2), 0.08, velocity=(0.0, -5.0))
        for material, x in (("liquid", 0.2), ("jelly", 0.5), ("snow", 0.8))
    )
    return mpm.MPMParams(
        discs=discs,
        particles_per_disc=150,
        n_grid=32,
        dt=2e-4,
        substeps_per_frame=20,
        n_frames=n_frames,
        gravity=20.0,
        youngs_modulus=3000.0,
        seed=seed,
    )


@pytest.fixture(scope="module")
def frames() -> mpm.Frames:
    return mpm.simulate(small_params())


def material(frames: mpm.Frames, name: str) -> np.ndarray:
    return frames.material == mpm.MATERIAL_IDS[name]


def test_closed_form_svd_matches_lapack():
    F = torch.randn(500, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    U, sig, Vt = mpm.svd2(F)
    torch.testing.assert_close(U @ torch.diag_embed(sig) @ Vt, F)
    torch.testing.assert_close(sig.abs().sort(dim=1).values, torch.linalg.svdvals(F).flip(1))
    torch.testing.assert_close(U @ U.transpose(1, 2), torch.eye(2, dtype=F.dtype).expand_as(F))


def test_transfers_conserve_mass_and_momentum_exactly():
    params = small_params()
    mu0, la0 = mpm.lame_parameters(params.youngs_modulus, params.poisson_ratio)
    state = mpm.initial_state(params)
    state.v = torch.randn_like(state.v)  # any velocity field: the transfer must not change totals
    for _ in range(30):
        mpm.substep(state, params, mu0, la0)
        stress = torch.zeros_like(state.F)  # the stress impulse sums to zero only over all nodes
        grid_mass, grid_momentum = mpm.particle_to_grid(
            state, params, stress, mpm.stencil(state.x, params.n_grid)
        )
        torch.testing.assert_close(grid_mass.sum(), state.mass.sum(), rtol=1e-12, atol=0)
        particle_momentum = (state.mass[:, None] * state.v).sum(dim=0)
        torch.testing.assert_close(
            grid_momentum.sum(dim=0), particle_momentum, rtol=1e-9, atol=1e-15
        )


def test_particle_mass_never_changes_and_particles_stay_in_the_box(frames):
    assert frames.mass.shape == (450,) and (frames.mass > 0).all()
    assert np.isfinite(frames.position).all()
    assert (frames.position > 0).all() and (frames.position < 1).all()
    # the discs did land: something reached the floor's boundary layer
    assert frames.position[-1, :, 1].min() < 4 / 32


def test_jelly_stays_elastic_snow_compacts_liquid_keeps_its_volume_ratio(frames):
    jelly, snow, liquid = (
        material(frames, "jelly"),
        material(frames, "snow"),
        material(frames, "liquid"),
    )
    assert (frames.Jp[:, jelly] == 1.0).all()
    assert (frames.Jp[0] == 1.0).all()
    assert frames.Jp[-1, snow].min() < 0.95  # compressed by the impact
    F = frames.F[:, liquid]
    np.testing.assert_allclose(F[..., 0], F[..., 3], rtol=1e-6)  # F = sqrt(J) I
    np.testing.assert_allclose(F[..., 1:3], 0.0, atol=1e-7)
    np.testing.assert_allclose(frames.Jp[:, liquid], F[..., 0] * F[..., 3], rtol=1e-5)
    assert frames.Jp[-1, liquid].std() > 1e-3


def test_frames_have_every_field_with_its_shape(frames):
    assert frames.position.shape == frames.velocity.shape == (6, 450, 2)
    for name in ("C", "F", "S"):
        assert getattr(frames, name).shape == (6, 450, 4)
        assert np.isfinite(getattr(frames, name)).all()
    assert frames.Jp.shape == (6, 450) and frames.time.shape == (6,)


def test_same_seed_same_data_other_seed_other_data(frames):
    again = mpm.simulate(small_params(seed=0))
    for name in ("position", "velocity", "C", "F", "Jp", "S"):
        assert np.array_equal(getattr(frames, name), getattr(again, name)), name
    other = mpm.simulate(small_params(seed=1, n_frames=2))
    assert not np.array_equal(other.position[0], frames.position[0])


# ---- the dataset cache -------------------------------------------------------------------

TINY_SIM = SimulationSettings(
    n_grid=32,
    particles_per_disc=40,
    materials=["snow"],
    disc_radius=0.1,
    drop_height=0.3,
    dt=2e-4,
    substeps_per_frame=5,
    n_frames=3,
)


def test_cache_is_built_once_then_loaded(tmp_path):
    logs: list[str] = []
    built = load_frames(TINY_SIM, tmp_path, log=logs.append)
    loaded = load_frames(TINY_SIM, tmp_path, log=logs.append)
    assert logs == [logs[0], "simulated frame 3/3"] and "simulating" in logs[0]
    assert np.array_equal(built.Jp, loaded.Jp) and np.array_equal(built.S, loaded.S)
    assert cache_path(TINY_SIM, tmp_path).exists()
    other = TINY_SIM.model_copy(update={"seed": 1})
    assert cache_path(other, tmp_path) != cache_path(TINY_SIM, tmp_path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip file at all")


def _tamper(path: Path) -> None:
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["Jp"] = arrays["Jp"] * 2  # the stored checksum no longer matches
    np.savez(path, **arrays)


def _reshape(path: Path) -> None:
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["position"] = arrays["position"][:, :10]
    np.savez(path, **arrays)


def _drop_member(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            if name != "S.npy":
                archive.writestr(name, payload)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _tamper, _reshape, _drop_member])
def test_bad_cache_file_is_removed_and_rebuilt(tmp_path, damage):
    good = load_frames(TINY_SIM, tmp_path, log=lambda _: None)
    path = cache_path(TINY_SIM, tmp_path)
    damage(path)
    logs: list[str] = []
    rebuilt = load_frames(TINY_SIM, tmp_path, log=logs.append)
    assert "removing bad cache file" in logs[0] and "simulating" in logs[1]
    assert np.array_equal(rebuilt.Jp, good.Jp)
    assert load_frames(TINY_SIM, tmp_path, log=logs.append).Jp.shape == good.Jp.shape
    assert len(logs) == 3  # the rebuilt file loads cleanly (the third: the build's progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.stem + ".lock"])


def test_concurrent_builders_build_once(tmp_path):
    script = (
        "import json, sys\n"
        "from models.data import load_frames\n"
        "from models.settings import SimulationSettings\n"
        "sim = SimulationSettings.model_validate(json.loads(sys.argv[1]))\n"
        "frames = load_frames(sim, sys.argv[2])\n"
        "print('shape', frames.Jp.shape)\n"
    )
    argv = [sys.executable, "-c", script, json.dumps(TINY_SIM.model_dump()), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert sum(out.count("simulating") for out in outputs) == 1
    assert all("shape (3, 40)" in out for out in outputs)


def test_field_samples_are_normalised_and_undo_exactly(tmp_path):
    sim = TINY_SIM.model_copy(update={"materials": ["liquid", "snow"], "n_frames": 4})
    frames = load_frames(sim, tmp_path, log=lambda _: None)
    samples = field_samples(frames, "F", n_frames=3)
    assert list(samples.frame_indices) == [0, 2, 3] or list(samples.frame_indices) == [0, 1, 3]
    assert samples.coords.shape == (3, 80, 3) and samples.values.shape == (3, 80, 4)
    assert samples.coords.min() >= -1 and samples.coords.max() <= 1
    assert list(samples.coords[:, 0, 0]) == [-1.0, 0.0, 1.0]
    np.testing.assert_allclose(samples.denormalise(samples.values), samples.truth, atol=1e-5)
    np.testing.assert_allclose(samples.truth, frames.F[samples.frame_indices], atol=0)


def test_scene_places_discs_inside_the_box_and_follows_the_seed():
    sim = SimulationSettings()
    params = scene(sim)
    assert [d.material for d in params.discs] == sim.materials
    for disc in params.discs:
        x, y = disc.center
        assert disc.radius < x < 1 - disc.radius and disc.radius < y < 1 - disc.radius
    assert scene(sim.model_copy(update={"seed": 5})).discs != params.discs
