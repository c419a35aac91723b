"""The dataset: MPM frames built from the config's `simulation` section, cached on disk, and
the normalised (t, x, y) -> field samples the SIREN learns. Trusted code.

The cache file is named by a hash of the simulation section and FORMAT_VERSION, written
atomically under an exclusive file lock, and carries a checksum of its arrays: a partial or
corrupt file is removed and rebuilt, never loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.atomic import write_atomic
from models.settings import FIELD_CHANNELS, SimulationSettings

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path("log/cache/data")
SIMULATION_PROGRESS_S = 10.0  # the longest silence while simulating
STAGGER = 0.15  # disc centres sit at drop_height + up to this much, drawn from the seed
_ARRAYS = ("position", "velocity", "C", "F", "Jp", "S", "material", "mass", "time")


class CorruptCache(Exception):
    """A cache file that must not be loaded (partial, not an npz, wrong shapes, bad checksum)."""


def scene(sim: SimulationSettings):  # -> mpm.MPMParams (mpm imports torch, so import late)
    """The MPM parameters of a simulation section: discs side by side in a row, each at
    drop_height plus a seeded stagger, so they land at different times."""
    from models.mpm import Disc, MPMParams

    rng = np.random.default_rng([sim.seed, 1])  # a stream apart from the particle sampling
    count = len(sim.materials)
    margin = 4.0 / sim.n_grid + sim.disc_radius
    centres_x = np.linspace(margin, 1.0 - margin, count) if count > 1 else np.array([0.5])
    heights = sim.drop_height + STAGGER * rng.random(count)
    discs = tuple(
        Disc(material, (float(x), float(y)), sim.disc_radius, velocity=(0.0, -sim.drop_speed))
        for material, x, y in zip(sim.materials, centres_x, heights, strict=True)
    )
    return MPMParams(
        discs=discs,
        particles_per_disc=sim.particles_per_disc,
        n_grid=sim.n_grid,
        dt=sim.dt,
        substeps_per_frame=sim.substeps_per_frame,
        n_frames=sim.n_frames,
        gravity=sim.gravity,
        youngs_modulus=sim.youngs_modulus,
        poisson_ratio=sim.poisson_ratio,
        seed=sim.seed,
    )


def cache_key(sim: SimulationSettings) -> str:
    """A short hash of the simulation section and the file format."""
    payload = json.dumps({"format": FORMAT_VERSION, "simulation": sim.model_dump()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(sim: SimulationSettings, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_dir) / f"mpm_{cache_key(sim)}.npz"


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _expected_shapes(sim: SimulationSettings) -> dict[str, tuple[int, ...]]:
    frames, particles = sim.n_frames, sim.particles_per_disc * len(sim.materials)
    shapes = {"position": (frames, particles, 2), "velocity": (frames, particles, 2)}
    shapes |= {name: (frames, particles, 4) for name in ("C", "F", "S")}
    shapes |= {"Jp": (frames, particles), "material": (particles,), "mass": (particles,)}
    return shapes | {"time": (frames,)}


def _read_cache(path: Path, sim: SimulationSettings):  # -> mpm.Frames
    from models.mpm import Frames

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CorruptCache(f"unreadable: {exc}") from None
    missing = set(_ARRAYS) - arrays.keys() | ({"checksum"} - arrays.keys())
    if missing:
        raise CorruptCache(f"missing arrays {sorted(missing)}")
    for name, shape in _expected_shapes(sim).items():
        if arrays[name].shape != shape:
            raise CorruptCache(f"{name} has shape {arrays[name].shape}, expected {shape}")
    if str(arrays["checksum"]) != _checksum(arrays):
        raise CorruptCache("checksum mismatch")
    return Frames(**{name: arrays[name] for name in _ARRAYS})


def _write_cache(path: Path, frames) -> None:
    arrays = {name: getattr(frames, name) for name in _ARRAYS}
    buffer = io.BytesIO()
    np.savez(buffer, checksum=np.array(_checksum(arrays)), **arrays)
    write_atomic(path, buffer.getvalue())


def load_frames(
    sim: SimulationSettings,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    log: Callable[[str], None] = print,
):  # -> mpm.Frames
    """The simulation's frames from the cache, building (and caching) them when absent or bad.

    Concurrent callers serialise on a lock file, so only one builds and none reads a
    half-written file."""
    from models.mpm import simulate

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_path(sim, cache_dir)
    with open(path.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                return _read_cache(path, sim)
            except CorruptCache as exc:
                log(f"removing bad cache file {path} ({exc}); rebuilding")
                path.unlink(missing_ok=True)
        log(f"simulating {sim.n_frames} frames of {len(sim.materials)} discs -> {path}")

        last_line = [time.monotonic()]

        def progress(frame: int, total: int) -> None:  # also keeps a no-output watchdog quiet
            if frame == total or time.monotonic() - last_line[0] >= SIMULATION_PROGRESS_S:
                last_line[0] = time.monotonic()
                log(f"simulated frame {frame}/{total}")

        frames = simulate(scene(sim), progress=progress)
        _write_cache(path, frames)
        return frames


@dataclass(frozen=True)
class FieldSamples:
    """Normalised samples of one field on the training frames (float32 numpy).

    coords (T, N, 3): (t, x, y) in [-1, 1]; values (T, N, C): (field - mean) / std per channel;
    truth (T, N, C): the field itself (float64), what the evaluator compares against."""

    field: str
    frame_indices: np.ndarray  # (T,) indices into the stored frames
    coords: np.ndarray
    values: np.ndarray
    truth: np.ndarray
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)

    def denormalise(self, values: np.ndarray) -> np.ndarray:
        """Field values in physical units from normalised ones (float64)."""
        return values.astype(np.float64) * self.std + self.mean

    def to_device(self, device: str | torch.device) -> TrainingData:
        """The samples as float32 tensors on `device`, as the trainer receives them."""
        import torch

        return TrainingData(
            coords=torch.from_numpy(self.coords).to(device),
            targets=torch.from_numpy(self.values).to(device),
        )


@dataclass(frozen=True)
class TrainingData:
    """What `trainer.train` gets: coords (frames, particles, 3) and targets (frames,
    particles, channels), normalised, on the training device."""

    coords: torch.Tensor
    targets: torch.Tensor


def training_frame_indices(stored_frames: int, n_frames: int) -> np.ndarray:
    """`n_frames` stored frames evenly spaced from the first to the last."""
    if not 2 <= n_frames <= stored_frames:
        raise ValueError(f"n_frames must be in [2, {stored_frames}], got {n_frames}")
    return np.unique(np.linspace(0, stored_frames - 1, n_frames).round().astype(np.int64))


def field_samples(frames, field: str = "Jp", n_frames: int = 24) -> FieldSamples:
    """Normalised coordinates and targets of `field` (Jp, F, S or C) on `n_frames` frames."""
    if field not in FIELD_CHANNELS:
        raise ValueError(f"unknown field {field!r}; choose one of {sorted(FIELD_CHANNELS)}")
    indices = training_frame_indices(frames.position.shape[0], n_frames)
    raw = getattr(frames, field)[indices].astype(np.float64)
    raw = raw.reshape(raw.shape[0], raw.shape[1], FIELD_CHANNELS[field])
    count, particles = raw.shape[:2]
    t = np.linspace(-1.0, 1.0, count)
    coords = np.empty((count, particles, 3), dtype=np.float32)
    coords[..., 0] = t[:, None]
    # the box is [0, 1]^2, so 2p - 1 maps it onto [-1, 1] for every frame alike
    coords[..., 1:] = 2.0 * frames.position[indices] - 1.0
    mean = raw.mean(axis=(0, 1))
    std = raw.std(axis=(0, 1))
    std = np.where(std > 1e-12, std, 1.0)  # a constant channel stays as it is, shifted to 0
    values = ((raw - mean) / std).astype(np.float32)
    return FieldSamples(field, indices, coords, values, raw, mean, std)
