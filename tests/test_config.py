"""The config loader: good configs load, bad ones give one precise message naming the key."""

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "multimaterial_1_discs_3types.yaml"


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


def test_search_space_must_name_real_keys(tmp_path):
    path = write(
        tmp_path,
        "training: {learning_rate: 0.001}\n"
        "exploration:\n  search_space:\n    training.lr: {low: 0.1, high: 1.0}\n",
    )
    with pytest.raises(ConfigError, match="names 'training.lr', which is not a key"):
        load_config(path)


def test_bad_range_is_explained(tmp_path):
    path = write(
        tmp_path,
        "training: {learning_rate: 0.001}\n"
        "exploration:\n  search_space:\n    training.learning_rate: {low: 0, high: 1, log: true}\n",
    )
    with pytest.raises(ConfigError, match="log-scaled range needs low > 0"):
        load_config(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
