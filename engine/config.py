"""The one config loader: strict YAML in, a validated `ExperimentConfig` out.

Every problem becomes a single `ConfigError` whose message names the file, line and key,
so the CLI can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# A config is a few KB; these bound the work a hostile or mistaken file can ask of the loader.
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_VALUES = 100_000  # scalars and collections, counted after aliases are expanded
MAX_YAML_DEPTH = 32
# libyaml's parser when it is installed: fast, and it caps nesting itself; same safe constructors
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Tags a plain YAML document may carry; anything else (e.g. !!python/object/apply) is refused.
_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:merge",  # `<<: *defaults`, the usual way a config reuses an anchor
}

KeyPath = tuple[str | int, ...]

# Counts are strict integers (a YAML 1e29 is a float or a string, never a count); each field
# adds its own upper bound, generous for a week-long run on one large GPU, short of absurd.
Count = Annotated[int, Field(strict=True, ge=1)]
CountFromZero = Annotated[int, Field(strict=True, ge=0)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Dollars = Annotated[float, Field(ge=0, allow_inf_nan=False)]
DAY_S = 24 * 3600
_NOT_AN_INTEGER = {"int_type", "int_parsing", "int_from_float"}
_COUNT_IN_DIGITS = ", written in digits (YAML reads 1e8 as text and 1.0e+8 as a float)"


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
    wall_s: Annotated[Seconds, Field(le=30 * DAY_S)] = 900.0
    no_output_s: Annotated[Seconds, Field(le=30 * DAY_S)] = 180.0
    kill_grace_s: Annotated[Seconds, Field(le=600)] = 5.0


class Limits(_Strict):
    """Per-run resource limits; None switches one off (memory is off by default on a GPU)."""

    memory_mb: Annotated[Count, Field(le=4 * 2**20)] | None = 8192  # 4 TB
    file_size_mb: Annotated[Count, Field(le=2**20)] | None = 512  # 1 TB
    open_files: Annotated[Count, Field(le=2**20)] | None = 1024  # Linux's default nr_open
    processes: Annotated[Count, Field(le=4 * 2**20)] | None = 512  # Linux's largest pid_max
    log_mb: Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)] = 20.0


class Prices(_Strict):
    """US dollars per million tokens: Claude Sonnet 5.5's list price (5-minute cache writes;
    cache reads at the higher published figure so the budget cap errs on the safe side).
    Override them for another model."""

    input: Dollars = 2.0
    output: Dollars = 10.0
    cache_read: Dollars = 0.20
    cache_write: Dollars = 2.50


class AnthropicSettings(_Strict):
    """The Claude agent: model, limits, endpoint, key file, budget and prices."""

    model: str = "claude-sonnet-5-5"
    max_tokens: Annotated[Count, Field(le=1_000_000)] = 32000
    temperature: float | None = None  # None: not sent (newer models refuse sampling settings)
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    # requests in one proposal, tool rounds and re-asks included
    max_turns: Annotated[Count, Field(le=200)] = 8
    # malformed answers answered with a correction before giving up
    max_reasks: Annotated[CountFromZero, Field(le=20)] = 2
    base_url: str | None = None  # None: the SDK's default (or ANTHROPIC_BASE_URL)
    key_file: str | None = None  # used when ANTHROPIC_API_KEY is unset; must be mode 0600
    budget_usd: Dollars | None = None  # the run pauses once its spend reaches this
    request_timeout_s: Annotated[Seconds, Field(le=4 * 3600)] = 600.0
    # the SDK's own retries of 408/409/429/5xx/connection errors
    max_retries: Annotated[CountFromZero, Field(le=20)] = 4
    # first SDK retry delay when the API gives no retry-after
    retry_backoff_s: Annotated[Seconds, Field(le=600)] = 0.5
    retry_backoff_max_s: Annotated[Seconds, Field(le=3600)] = 30.0
    # whole-request retries for errors arriving mid-stream
    stream_retries: Annotated[CountFromZero, Field(le=20)] = 3
    # first wait before such a retry (doubles, jittered)
    stream_retry_backoff_s: Annotated[Seconds, Field(le=600)] = 2.0
    prices: Prices = Prices()

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


SLOT_ROLES = ("exploit", "exploit_second", "explore", "challenge")


class JobQueueCluster(_Strict):
    """A dask-jobqueue cluster proctor starts itself: each Dask worker is a batch job.

    The keys mirror dask-jobqueue's own (queue, cores, memory, walltime, job_extra_directives,
    job_script_prologue), so a lab's existing settings carry over; `adaptive_minimum` and
    `adaptive_maximum` bound how many jobs it keeps."""

    system: Literal["slurm", "lsf", "pbs"]
    queue: str | None = None
    account: str | None = None  # Slurm --account, LSF -P, PBS -A
    # what each job asks of the queue; its worker runs one node at a time on all of it
    cores: Annotated[Count, Field(le=4096)] = 2
    memory: str = "8GB"
    gpus: Annotated[CountFromZero, Field(le=64)] = 0
    # Slurm's forms (04:00:00, 90 minutes as 90, 1-00:00:00), written in each system's own
    walltime: str = "04:00:00"
    job_extra_directives: list[str] = []
    job_script_prologue: list[str] = []  # shell lines before the worker starts (module load ...)
    python: str | None = None  # the workers' Python (default: the one running proctor)
    interface: str | None = None  # network interface of the workers and scheduler (ib0, ...)
    local_directory: str | None = None  # node-local scratch for the workers
    adaptive_minimum: Annotated[CountFromZero, Field(le=10_000)] = 0
    adaptive_maximum: Annotated[Count, Field(le=10_000)] = 4

    @field_validator("queue", "account", "memory", "walltime", "python", "interface",
                     "local_directory", "job_extra_directives", "job_script_prologue")
    @classmethod
    def _one_line_each(cls, value: str | list[str] | None) -> str | list[str] | None:
        """Each value becomes one line of a batch script: a line break would add its own."""
        for text in [value] if isinstance(value, str) else value or []:
            if any(ord(char) < 32 or ord(char) == 127 for char in text):
                raise ValueError("must be one line of text (no line breaks or control "
                                 "characters: each becomes one line of the job script)")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", value.strip(), re.IGNORECASE):
            raise ValueError("must be a size such as 8GB or 16GiB")
        return value.strip()

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", value.strip()):
            raise ValueError("must be a time such as 04:00:00, 30:00 or 1-00:00:00")
        return value.strip()

    @model_validator(mode="after")
    def _bounds(self) -> JobQueueCluster:
        if self.adaptive_minimum > self.adaptive_maximum:
            raise ValueError("adaptive_minimum must not exceed adaptive_maximum")
        return self


class DaskSettings(_Strict):
    """Where `executor: dask` sends runs: an existing scheduler's address, a jobqueue cluster
    proctor starts, or `local` (a LocalCluster of `parallel` worker processes on this box)."""

    scheduler: str | None = None  # tcp://host:8786, tls://..., or "local"
    cluster: JobQueueCluster | None = None
    # a run whose worker was lost is sent again this many times before it counts as failed
    retries: Annotated[CountFromZero, Field(le=10)] = 1
    # on each worker: where runs and the simulated data cache live ($USER, $SLURM_TMPDIR:
    # the worker's values); default: the worker's own local directory
    scratch: str | None = None
    connect_timeout_s: Annotated[Seconds, Field(le=3600)] = 30.0

    @model_validator(mode="after")
    def _one_place(self) -> DaskSettings:
        if self.scheduler is not None and self.cluster is not None:
            raise ValueError("give either scheduler or cluster, not both")
        return self


class ExecutorSettings(_Strict):
    """Where the k slots of `parallel` run: `local` (sandboxed runs on this machine, each
    pinned to its own GPU where there are several) or `dask` (one task per run)."""

    kind: Literal["local", "dask"] = "local"
    # local: the device each slot trains on, e.g. [cuda:0, cuda:1]; empty: one visible GPU per
    # slot when this machine has GPUs, else the config's training.device
    devices: list[Annotated[str, Field(pattern=r"^(cpu|cuda|cuda:\d{1,3})$")]] = []
    dask: DaskSettings = DaskSettings()

    @model_validator(mode="after")
    def _dask_has_a_place(self) -> ExecutorSettings:
        if self.kind == "dask" and self.dask.scheduler is None and self.dask.cluster is None:
            raise ValueError("executor dask needs dask.scheduler (an address, or local) "
                             "or dask.cluster (slurm, lsf or pbs)")
        return self


MAX_ITERATIONS = 100_000  # the config's bound, and `--iterations`'s


class Exploration(_Strict):
    """How proctor drives the experiment; the other sections belong to the experiment itself."""

    agent: Literal["heuristic", "anthropic"] | None = None  # None: anthropic when a key is set
    approval: Literal["auto", "code", "all"] = "code"
    iterations: Annotated[Count, Field(le=MAX_ITERATIONS)] = 24
    block_size: Annotated[Count, Field(le=10_000)] = 12
    score: Literal["puct", "ucb1"] = "puct"
    ucb_c: float = 1.414
    seed: int = 0
    target_r2: float | None = None
    max_wall_hours: Annotated[float, Field(gt=0, le=366 * 24, allow_inf_nan=False)] | None = None
    parallel: Annotated[Count, Field(le=64)] = 1  # nodes in flight at once (slots)
    # what each slot is asked for, slot 1 first (the original's parallel mode); empty: any
    slot_roles: list[Literal["exploit", "exploit_second", "explore", "challenge"]] = []
    executor: ExecutorSettings = ExecutorSettings()

    @model_validator(mode="after")
    def _ab_needs_two_seeds(self) -> Exploration:
        if self.ab_seeds == 1:
            raise ValueError("ab_seeds: an A/B test needs 2 or more seeds (0 switches it off)")
        return self

    @model_validator(mode="after")
    def _a_role_per_slot_at_most(self) -> Exploration:
        if len(self.slot_roles) > self.parallel:
            raise ValueError(f"slot_roles names {len(self.slot_roles)} roles for "
                             f"{self.parallel} slot(s) (parallel): one role per slot at most")
        return self
    runner: Literal["zygote", "subprocess"] = "zygote"
    repair_attempts: Annotated[CountFromZero, Field(le=10)] = 2
    # A/B-test every code change that beats its parent over this many paired seeds before it
    # may become a parent (0: off; see `proctor ab`)
    ab_seeds: Annotated[CountFromZero, Field(le=50)] = 0
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

    def slot_role(self, slot: int) -> str | None:
        """What slot `slot` (1-based) is asked for: `slot_roles` cycled over the slots; None
        when the config names no roles."""
        roles = self.slot_roles
        return roles[(slot - 1) % len(roles)] if roles else None


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
    """Record the line of every key, refuse non-plain tags, non-text keys and duplicate keys."""
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
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                where = ".".join(map(str, path)) or "top level"
                raise ConfigError(f"{source}:{line}: {where}: a key must be plain text")
            key = key_node.value
            if key in seen:
                dotted = ".".join(map(str, path + (key,)))
                raise ConfigError(f"{source}:{line}: {dotted}: duplicate key")
            seen.add(key)
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines, source)


def _check_expansion(text: str, source: str) -> None:
    """Refuse, from the parser's events and before any node is built, a recursive anchor,
    nesting deeper than MAX_YAML_DEPTH and more than MAX_YAML_VALUES values once aliases
    are expanded (a few hundred bytes of nested aliases can stand for billions)."""
    anchored_sizes: dict[str, int] = {}  # anchor -> values in its node, aliases expanded
    open_collections: list[tuple[str | None, int]] = []  # (anchor, values counted before it)
    values = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        where = f"{source}:{event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_collections):
                raise ConfigError(
                    f"{where}: alias *{event.anchor} sits inside the node it names "
                    "(a recursive anchor); configs cannot refer to themselves"
                )
            values += anchored_sizes.get(event.anchor, 0)  # undefined: the composer says so
        elif isinstance(event, yaml.ScalarEvent):
            values += 1
            if event.anchor is not None:
                anchored_sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_collections.append((event.anchor, values))
            values += 1
            if len(open_collections) > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_collections.pop()
            if anchor is not None:
                anchored_sizes[anchor] = values - before
        if values > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: more than {MAX_YAML_VALUES:,} values once aliases are expanded "
                "(a config needs a few hundred)"
            )


def _yaml_problem(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    line = f"{mark.line + 1}" if mark is not None else "?"
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{source}:{line}: not valid YAML: {problem}"


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Plain, bounded YAML to a mapping plus the line of every key path."""
    loader = _YAML_LOADER(text)
    try:
        _check_expansion(text, source)
        root = loader.get_single_node()
        if root is None:
            raise ConfigError(f"{source}: the file is empty")
        lines: dict[KeyPath, int] = {}
        _walk(root, (), lines, source)
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc, source)) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of sections")
    return data, lines


def _read_config_text(path: Path) -> str:
    """The text of a config file, refused unparsed (and unread past the limit) above
    MAX_CONFIG_BYTES."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes (1 MB), the limit for a config file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None


def _line_of(loc: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    """The line of the deepest prefix of `loc` that appears in the file."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def _describe(loc: KeyPath, message: str, lines: dict[KeyPath, int], source: str) -> str:
    """One problem as `file:line: dotted.key: message` (no line when the key is not in the file)."""
    line = _line_of(loc, lines)
    prefix = f"{source}:{line}" if line is not None else source
    return f"{prefix}: {'.'.join(map(str, loc)) or 'top level'}: {message}"


def describe_errors(exc: ValidationError, lines: dict[KeyPath, int], source: str) -> str:
    """Pydantic errors as `file:line: dotted.key: message`, one per line."""
    out = []
    for error in exc.errors():
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        if error["type"] in _NOT_AN_INTEGER and isinstance(error["input"], str | float):
            message += _COUNT_IN_DIGITS
        out.append(_describe(tuple(error["loc"]), message.removeprefix("Value error, "), lines,
                             source))
    return "\n".join(out)


def load_config(path: str | Path) -> ExperimentConfig:
    """Load and validate a config file; raises ConfigError with a precise message."""
    path = Path(path)
    data, lines = parse_yaml(_read_config_text(path), str(path))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, lines, str(path))) from None


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
    _, lines = parse_yaml(_read_config_text(path), str(path))
    raise ConfigError("\n".join(
        _describe(tuple(error.get("loc", ())), error.get("msg", "invalid"), lines, str(path))
        for error in errors
    ))
