"""The one config loader: strict YAML in, a validated `ExperimentConfig` out.

Every problem becomes a single `ConfigError` whose message names the file, line and key,
so the CLI can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

# Tags a plain YAML document may carry; anything else (e.g. !!python/object/apply) is refused.
_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """A config problem, worded for the person who wrote the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamRange(_Strict):
    """One searchable parameter: a numeric range (optionally log-scaled) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[int | float | str | bool] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> ParamRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError("low must be a finite number below high")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


class Timeouts(_Strict):
    wall_s: float = 900.0
    no_output_s: float = 180.0
    kill_grace_s: float = 5.0


class Limits(_Strict):
    """Per-run resource limits; None switches one off (memory is off by default on a GPU)."""

    memory_mb: int | None = 8192
    file_size_mb: int | None = 512
    open_files: int | None = 1024
    processes: int | None = 512
    log_mb: float = 20.0


class Prices(_Strict):
    """US dollars per million tokens: Claude Sonnet 5.5's list price (5-minute cache writes;
    cache reads at the higher published figure so the budget cap errs on the safe side).
    Override them for another model."""

    input: float = 2.0
    output: float = 10.0
    cache_read: float = 0.20
    cache_write: float = 2.50

    @field_validator("input", "output", "cache_read", "cache_write")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite price of 0 or more")
        return value


class AnthropicSettings(_Strict):
    """The Claude agent: model, limits, endpoint, key file, budget and prices."""

    model: str = "claude-sonnet-5-5"
    max_tokens: int = 32000
    temperature: float | None = None  # None: not sent (newer models refuse sampling settings)
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    max_turns: int = 8  # requests in one proposal, tool rounds and re-asks included
    max_reasks: int = 2  # malformed answers answered with a correction before giving up
    base_url: str | None = None  # None: the SDK's default (or ANTHROPIC_BASE_URL)
    key_file: str | None = None  # used when ANTHROPIC_API_KEY is unset; must be mode 0600
    budget_usd: float | None = None  # the run pauses once its spend reaches this
    request_timeout_s: float = 600.0
    max_retries: int = 4  # the SDK's own retries of 408/409/429/5xx/connection errors
    retry_backoff_s: float = 0.5  # first SDK retry delay when the API gives no retry-after
    retry_backoff_max_s: float = 30.0
    stream_retries: int = 3  # whole-request retries for errors arriving mid-stream
    stream_retry_backoff_s: float = 2.0  # first wait before such a retry (doubles, jittered)
    prices: Prices = Prices()

    @field_validator("max_tokens", "max_turns")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("max_reasks", "max_retries", "stream_retries")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator(
        "request_timeout_s", "retry_backoff_s", "retry_backoff_max_s", "stream_retry_backoff_s"
    )
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a positive number of seconds")
        return value

    @field_validator("budget_usd")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError("must be a finite amount of 0 or more")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class Exploration(_Strict):
    """How proctor drives the experiment; the other sections belong to the experiment itself."""

    agent: Literal["heuristic", "anthropic"] | None = None  # None: anthropic when a key is set
    approval: Literal["auto", "code", "all"] = "code"
    iterations: int = 24
    block_size: int = 12
    score: Literal["puct", "ucb1"] = "puct"
    ucb_c: float = 1.414
    seed: int = 0
    target_r2: float | None = None
    max_wall_hours: float | None = None
    parallel: int = 1
    runner: Literal["zygote", "subprocess"] = "zygote"
    repair_attempts: int = 2
    # uncommitted changes to editable files at run start: refuse (with instructions) or
    # adopt them as a first "pre-existing changes" node
    dirty: Literal["adopt", "refuse"] = "refuse"
    harness: str = "models.harness"
    instructions: str = "instructions/instruction_multimaterial_1_discs_3types.md"
    editable_files: list[str] = ["models/siren.py", "models/trainer.py"]
    search_space: dict[str, ParamRange] = {}
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    anthropic: AnthropicSettings = AnthropicSettings()

    @field_validator("iterations", "block_size", "parallel")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("repair_attempts")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value


class ExperimentConfig(_Strict):
    """A whole config file. Experiment sections stay mappings here: the experiment's own
    schema (run through its harness with --check) validates them, so the engine stays generic."""

    description: str = ""
    dataset: dict[str, Any] = {}
    simulation: dict[str, Any] = {}
    model: dict[str, Any] = {}
    training: dict[str, Any] = {}
    exploration: Exploration = Exploration()

    def experiment_sections(self) -> dict[str, Any]:
        return self.model_dump(exclude={"exploration"})

    def value_at(self, dotted: str) -> Any:
        """The value at a dotted key such as `training.learning_rate`; KeyError if absent."""
        node: Any = self.model_dump()
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(dotted)
            node = node[part]
        return node

    @model_validator(mode="after")
    def _search_space_points_at_real_keys(self) -> ExperimentConfig:
        for dotted in self.exploration.search_space:
            try:
                self.value_at(dotted)
            except KeyError:
                raise ValueError(
                    f"exploration.search_space names '{dotted}', which is not a key of this config"
                ) from None
        return self


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], source: str) -> None:
    """Record the line of every key, refuse non-plain tags and duplicate keys."""
    if node.tag not in _PLAIN_TAGS:
        where = ".".join(map(str, path)) or "top level"
        raise ConfigError(
            f"{source}:{node.start_mark.line + 1}: {where}: YAML tag '{node.tag}' is not allowed "
            "(configs are plain YAML: no python objects or custom tags)"
        )
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            _walk(key_node, path + ("<key>",), {}, source)
            key = key_node.value
            if key in seen:
                dotted = ".".join(map(str, path + (key,)))
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{source}:{line}: {dotted}: duplicate key")
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines, source)


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Plain YAML to a mapping plus the line of every key path."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}" if mark is not None else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}:{line}: not valid YAML: {problem}") from None
    if root is None:
        raise ConfigError(f"{source}: the file is empty")
    lines: dict[KeyPath, int] = {}
    _walk(root, (), lines, source)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of sections")
    return data, lines


def _line_of(loc: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    """The line of the deepest prefix of `loc` that appears in the file."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def describe_errors(exc: ValidationError, lines: dict[KeyPath, int], source: str) -> str:
    """Pydantic errors as `file:line: dotted.key: message`, one per line."""
    out = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        line = _line_of(loc, lines)
        dotted = ".".join(map(str, loc)) or "top level"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        message = message.removeprefix("Value error, ")
        prefix = f"{source}:{line}" if line is not None else source
        out.append(f"{prefix}: {dotted}: {message}")
    return "\n".join(out)


def load_config(path: str | Path) -> ExperimentConfig:
    """Load and validate a config file; raises ConfigError with a precise message."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config: {exc}") from None
    data, lines = parse_yaml(text, source)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, lines, source)) from None


def find_project_root(config_path: str | Path) -> Path:
    """The experiment's project root: the nearest ancestor of the config holding `models/`,
    else the current directory."""
    start = Path(config_path).resolve().parent
    for candidate in (start, *start.parents):
        if (candidate / "models").is_dir():
            return candidate
    return Path.cwd()


def check_experiment_sections(
    path: str | Path, config: ExperimentConfig, project_root: Path
) -> None:
    """Validate the experiment's own sections with its harness (`--check`, no torch import).

    The engine stays generic: the experiment owns its schema, we own the line numbers."""
    import json
    import subprocess
    import sys

    path = Path(path)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", config.exploration.harness, "--check", str(path.resolve())],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{path}: the experiment's config check did not finish in 60 s") from None
    try:
        report = json.loads(completed.stdout or "{}")
        errors = report.get("errors", [])
    except (json.JSONDecodeError, AttributeError):
        errors = None
    if completed.returncode == 0 and errors == []:
        return
    if errors is None or (completed.returncode != 0 and not errors):
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise ConfigError(
            f"{path}: the experiment's config check ({config.exploration.harness} --check) "
            f"failed: {' | '.join(tail) or 'no output'}"
        )
    _, lines = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    out = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        line = _line_of(loc, lines)
        dotted = ".".join(map(str, loc)) or "top level"
        prefix = f"{path}:{line}" if line is not None else str(path)
        out.append(f"{prefix}: {dotted}: {error.get('msg', 'invalid')}")
    raise ConfigError("\n".join(out))
