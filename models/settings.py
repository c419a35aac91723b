"""The experiment's config schema: the description, dataset, simulation, model and training
sections. Trusted code; imports neither torch nor numpy, so `harness --check` stays fast.

`exploration` belongs to the supervisor and is accepted here as an opaque mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
# numpy's and torch's generators both take any seed in this range
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Upper bounds on sizes and counts refuse a typo that asks for centuries of work, yet leave
# room for a week-long run on one large GPU (an H200: ~1e9 small training steps in a week).
MAX_FRAMES = 10_000
MAX_SIMULATION_UPDATES = 10**11  # the default scene is 2.7e7 (about 90 s on this CPU)
MAX_STEPS = 1_000_000_000
_NOT_AN_INTEGER = {"int_type", "int_parsing", "int_from_float"}
_COUNT_IN_DIGITS = ", written in digits (YAML reads 1e8 as text and 1.0e+8 as a float)"
# What a config file may ask of the YAML reader (a config is a few KB).
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_VALUES = 100_000  # scalars and collections, counted after aliases are expanded
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when installed
FieldName = Literal["Jp", "F", "S", "C"]
MaterialName = Literal["liquid", "jelly", "snow"]

# Output channels of each field the network can learn.
FIELD_CHANNELS: dict[str, int] = {"Jp": 1, "F": 4, "S": 4, "C": 4}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DatasetSettings(_Section):
    """Which field the network learns and on how many stored frames."""

    field: FieldName = "Jp"
    n_frames: Annotated[int, Field(ge=2, le=MAX_FRAMES)] = 24


class SimulationSettings(_Section):
    """The MPM run that generates the data; the data cache is keyed by this section."""

    seed: Seed = 0
    n_grid: Annotated[int, Field(ge=16, le=1024)] = 64
    particles_per_disc: Annotated[PositiveInt, Field(le=1_000_000)] = 1000
    materials: Annotated[list[MaterialName], Field(min_length=1, max_length=8)] = [
        "liquid",
        "jelly",
        "snow",
    ]
    disc_radius: Annotated[float, Field(gt=0, le=0.25)] = 0.1
    drop_height: Annotated[float, Field(gt=0, lt=1)] = 0.3
    drop_speed: Annotated[float, Field(ge=0, le=20, allow_inf_nan=False)] = 0.0
    dt: Positive = 1e-4
    substeps_per_frame: Annotated[PositiveInt, Field(le=10_000)] = 40  # dt down to ~1e-6
    n_frames: Annotated[int, Field(ge=2, le=MAX_FRAMES)] = 48
    gravity: Annotated[float, Field(allow_inf_nan=False)] = 20.0
    youngs_modulus: Positive = 1000.0
    poisson_ratio: Annotated[float, Field(ge=0, lt=0.5)] = 0.2

    @model_validator(mode="after")
    def _within_a_weeks_work(self) -> SimulationSettings:
        # each key has its bound, but their product is the work: particles and grid cells,
        # every substep of every frame
        updates = ((len(self.materials) * self.particles_per_disc + self.n_grid**2)
                   * self.substeps_per_frame * self.n_frames)
        if updates > MAX_SIMULATION_UPDATES:
            raise ValueError(
                f"the simulation asks for {updates:.1e} particle and grid-cell updates, over "
                f"the {MAX_SIMULATION_UPDATES:.0e} of about a week on one CPU core; lower "
                "n_frames, substeps_per_frame, particles_per_disc or n_grid")
        return self

    @model_validator(mode="after")
    def _discs_fit_the_box(self) -> SimulationSettings:
        # discs sit side by side in a row, clear of the walls' boundary cells
        width = 1.0 - 8.0 / self.n_grid
        if 2 * self.disc_radius * len(self.materials) > width:
            raise ValueError(
                f"{len(self.materials)} discs of radius {self.disc_radius} do not fit side by "
                f"side in the box (at most {width / (2 * len(self.materials)):.3f})"
            )
        if self.drop_height + self.disc_radius + 0.15 > 1.0 - 4.0 / self.n_grid:
            raise ValueError("drop_height + disc_radius leaves the discs above the box's top")
        if self.drop_height - self.disc_radius < 4.0 / self.n_grid:
            raise ValueError("drop_height - disc_radius puts the discs into the floor")
        return self


class ModelSettings(_Section):
    """The SIREN (models/siren.py)."""

    hidden_dim: Annotated[PositiveInt, Field(le=16_384)] = 64
    n_layers: Annotated[PositiveInt, Field(le=64)] = 3
    omega_0: Positive = 30.0
    learnable_omega: bool = False


class TrainingSettings(_Section):
    """The training loop (models/trainer.py)."""

    steps: Annotated[PositiveInt, Field(le=MAX_STEPS)] = 1000
    learning_rate: Positive = 1e-4
    frames_per_batch: Annotated[PositiveInt, Field(le=MAX_FRAMES)] = 4
    seed: Seed = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")] = "auto"
    log_every: Annotated[PositiveInt, Field(le=MAX_STEPS)] = 100


class ExperimentSettings(_Section):
    """A whole config file as the experiment sees it."""

    description: str = ""
    dataset: DatasetSettings = DatasetSettings()
    simulation: SimulationSettings = SimulationSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    exploration: dict[str, Any] | None = None  # the supervisor's section, not ours to check

    @model_validator(mode="after")
    def _enough_stored_frames(self) -> ExperimentSettings:
        if self.dataset.n_frames > self.simulation.n_frames:
            raise ValueError(
                f"dataset.n_frames ({self.dataset.n_frames}) exceeds the "
                f"{self.simulation.n_frames} frames the simulation stores"
            )
        return self


class SettingsError(Exception):
    """A config the experiment cannot run; `errors` holds (loc, msg) pairs."""

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.errors = errors
        super().__init__(
            "; ".join(f"{'.'.join(map(str, loc)) or 'config'}: {msg}" for loc, msg in errors)
        )


def validate_settings(data: Any) -> ExperimentSettings:
    """Validate a parsed config mapping; raises SettingsError naming every bad key."""
    if not isinstance(data, dict):
        raise SettingsError([((), "the top level must be a mapping of sections")])
    try:
        return ExperimentSettings.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            if error["type"] in _NOT_AN_INTEGER and isinstance(error["input"], str | float):
                message += _COUNT_IN_DIGITS
            errors.append((tuple(error["loc"]), message.removeprefix("Value error, ")))
        raise SettingsError(errors) from None


def _parse_bounded(text: str) -> Any:
    """yaml.safe_load, refusing an alias to an unfinished node (a recursive anchor) and aliases
    that expand past MAX_YAML_VALUES values. proctor's loader refuses these first, with line
    numbers; this guards a harness run by hand (models/ cannot import the engine)."""
    anchored_sizes: dict[str, int] = {}  # anchor -> values in its finished node
    open_collections: list[tuple[str | None, int]] = []  # (anchor, values counted before it)
    values = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchored_sizes:
                raise SettingsError([((), f"alias *{event.anchor} is recursive or undefined")])
            values += anchored_sizes[event.anchor]
        elif isinstance(event, yaml.NodeEvent):  # a scalar or a collection's start
            values += 1
            if isinstance(event, yaml.CollectionStartEvent):
                open_collections.append((event.anchor, values - 1))
            elif event.anchor is not None:
                anchored_sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_collections.pop()
            if anchor is not None:
                anchored_sizes[anchor] = values - before
        if values > MAX_YAML_VALUES:
            raise SettingsError([((), f"more than {MAX_YAML_VALUES:,} values once aliases expand")])
    return yaml.load(text, Loader=_YAML_LOADER)


def load_settings(path: str | Path) -> ExperimentSettings:
    """Read a YAML config (at most MAX_CONFIG_BYTES, aliases bounded) and validate its
    experiment sections."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise SettingsError([((), f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes")])
        data = _parse_bounded(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([((), f"cannot read {path}: {exc}")]) from None
    except yaml.YAMLError as exc:
        raise SettingsError([((), f"not valid YAML: {exc}")]) from None
    return validate_settings(data)
