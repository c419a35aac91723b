"""The config loader: good configs load, bad ones give one precise message naming the key."""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from engine.config import ConfigError, check_experiment_sections, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "multimaterial_1_discs_3types.yaml"
# `python -m MODULE ARGS` under an address-space cap, so a loader that expands aliases fails
# instead of taking the machine's memory (the unbounded loader needed 11 GB for the bomb below).
CAPPED_MODULE = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, 512 * 2**20)); "
    "del sys.argv[0]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_default_config_loads_with_its_search_space():
    config = load_config(DEFAULT)
    assert config.exploration.search_space["training.learning_rate"].log
    assert config.value_at("training.learning_rate") > 0
    assert config.exploration.editable_files == ["models/siren.py", "models/trainer.py"]


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = write(tmp_path, "exploration:\n  iterations: 3\n  ucb_k: 2.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:3: exploration.ucb_k: unknown key"


def test_wrong_type_is_named_with_its_line(tmp_path):
    path = write(tmp_path, "exploration:\n  block_size: twelve\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: exploration.block_size:")
    assert "integer" in message


def test_python_object_tag_is_refused_before_anything_is_constructed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        "description: x\n"
        f"training: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:2: training: YAML tag" in str(caught.value)
    assert not marker.exists()


def test_truncated_yaml_names_the_line(tmp_path):
    text = DEFAULT.read_text()
    path = write(tmp_path, text[: text.index("search_space:") + 40])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:")


def test_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "exploration:\n  iterations: 3\n  iterations: 4\n")
    with pytest.raises(ConfigError, match=r":3: exploration.iterations: duplicate key"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "training: {learning_rate: 0.001}\n"
            "exploration:\n  search_space:\n    training.lr: {low: 0.1, high: 1.0}\n",
            "names 'training.lr', which is not a key",
        ),
        (
            "training: {learning_rate: 0.001}\nexploration:\n  search_space:\n"
            "    training.learning_rate: {low: 0, high: 1, log: true}\n",
            "log-scaled range needs low > 0",
        ),
        (
            "exploration:\n  iterations: 100000000\n",
            ":2: exploration.iterations: Input should be less than or equal to 100000",
        ),
        (
            "exploration:\n  iterations: 24.0\n",
            ":2: exploration.iterations: Input should be a valid integer",
        ),
        (
            "exploration:\n  timeouts: {wall_s: 1.0e+12}\n",
            ":2: exploration.timeouts.wall_s: Input should be less than or equal to 2592000",
        ),
        (
            "exploration:\n  anthropic:\n    max_retries: 1000000\n",
            ":3: exploration.anthropic.max_retries: Input should be less than or equal to 20",
        ),
        (
            "exploration:\n  parallel: 2\n  slot_roles: [exploit, explore, challenge]\n",
            "slot_roles names 3 roles for 2 slot",
        ),
        (
            "exploration:\n  executor:\n    kind: dask\n    dask:\n      cluster:\n"
            "        system: slurm\n        queue: \"gpu\\n#SBATCH --uid=0\"\n",
            "queue: .*must be one line of text",
        ),
        (
            "exploration:\n  executor:\n    devices: [\"tpu:0; rm -rf /\"]\n",
            "exploration.executor.devices.0: String should match pattern",
        ),
    ],
    ids=["unknown-search-key", "log-range-from-0", "iterations", "iterations-float",
         "wall-seconds", "retries", "roles-beyond-slots", "job-script-line-break",
         "device-name"],
)
def test_bad_exploration_values_are_explained(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_a_config_over_1_mb_is_refused_unparsed(tmp_path):
    path = write(tmp_path, "description: " + "x" * 1_000_000 + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: larger than 1,000,000 bytes (1 MB), the limit for a config file"
    )


def test_a_100_mb_config_is_refused_without_being_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.truncate(100 * 10**6)  # sparse: 100 MB on paper, nothing on disk
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="the limit for a config file"):
            load_config(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def alias_bomb() -> str:
    """The "billion laughs": 9 levels of 9 aliases stand for 9**9 (387 million) strings."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def capped(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CAPPED_MODULE, module, *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("text", "message", "harness_message"),
    [
        (
            alias_bomb(),
            ":6: more than 100,000 values once aliases are expanded",
            "more than 100,000 values once aliases expand",
        ),
        (
            "a: &a [*a]\n",
            ":1: alias *a sits inside the node it names (a recursive anchor)",
            "alias *a is recursive or undefined",
        ),
        (
            "a: &a {b: {c: *a}}\n",
            ":1: alias *a sits inside the node it names",
            "alias *a is recursive or undefined",
        ),
    ],
    ids=["alias-bomb", "recursive-list", "recursive-mapping"],
)
def test_alias_bombs_and_recursive_anchors_are_one_message(tmp_path, text, message,
                                                           harness_message):
    assert len(text.encode()) < 500
    path = write(tmp_path, text)
    for command in (["train", str(path)], ["run", str(path), "--headless"]):
        result = capped("tui.cli", *command)
        assert result.returncode == 2, result.stderr
        header, *problems = result.stderr.splitlines()
        assert header == "proctor: bad config:"
        assert len(problems) == 1 and problems[0].startswith(f"{path}{message}")
    # the experiment's own reader, for a harness run by hand
    check = capped("models.harness", "--check", str(path))
    assert check.returncode == 2, check.stderr
    assert json.loads(check.stdout) == {"errors": [{"loc": [], "msg": harness_message}]}


def test_deep_nesting_is_refused(tmp_path):
    path = write(tmp_path, "description: " + "[" * 900 + "]" * 900 + "\n")
    with pytest.raises(ConfigError, match=r":1: nested deeper than 32 levels"):
        load_config(path)


def test_a_key_that_is_not_text_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r":2: training: a key must be plain text"):
        load_config(write(tmp_path, "training:\n  [a, b]: 1\n"))


def test_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = write(
        tmp_path,
        "simulation:\n  seed: &seed 7\n"
        "training:\n  seed: *seed\n  learning_rate: 1.0e-3\n"
        "model:\n  hidden_dim: 64\n  omega_0: 30.0\n"
        "exploration:\n  search_space:\n"
        "    model.omega_0: &wide {low: 5.0, high: 80.0}\n"
        "    model.hidden_dim: {<<: *wide, integer: true}\n",
    )
    config = load_config(path)
    assert config.value_at("training.seed") == config.value_at("simulation.seed") == 7
    assert config.exploration.search_space["model.hidden_dim"].integer
    assert config.exploration.search_space["model.hidden_dim"].low == 5.0
    check_experiment_sections(path, config, REPO)


DIGITS = ", written in digits (YAML reads 1e8 as text and 1.0e+8 as a float)"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "training: {steps: 100000000000000000000000000000}",
            "training.steps: Input should be less than or equal to 1000000000",
        ),
        ("training: {steps: 1e29}", f"training.steps: Input should be a valid integer{DIGITS}"),
        ("training: {steps: 1.0e+29}", f"training.steps: Input should be a valid integer{DIGITS}"),
        (
            "simulation: {substeps_per_frame: 1e8}",
            f"simulation.substeps_per_frame: Input should be a valid integer{DIGITS}",
        ),
        (
            "simulation: {substeps_per_frame: 100000000}",
            "simulation.substeps_per_frame: Input should be less than or equal to 10000",
        ),
        (
            "simulation: {n_frames: 100000000}",
            "simulation.n_frames: Input should be less than or equal to 10000",
        ),
        (
            "simulation: {particles_per_disc: 1000000, n_frames: 10000, n_grid: 1024, "
            "disc_radius: 0.05}",
            "simulation: the simulation asks for 1.6e+12 particle and grid-cell "
            "updates, over the 1e+11 of about a week on one CPU core; lower n_frames, "
            "substeps_per_frame, particles_per_disc or n_grid",
        ),
    ],
    ids=["steps", "steps-1e29", "steps-float", "substeps-1e8", "substeps", "frames",
         "each-within-bounds-but-years-together"],
)
def test_absurd_sizes_are_refused_by_the_experiment_schema(tmp_path, line, message):
    path = write(tmp_path, f"description: x\n{line}\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        check_experiment_sections(path, config, REPO)
    assert str(caught.value) == f"{path}:2: {message}"
