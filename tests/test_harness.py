"""The run harness as a real subprocess: results, exit codes, divergence, failures, --check."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.data import load_frames, training_frame_indices
from models.harness import METRIC_KEYS, STATE_FILE
from models.settings import load_settings
from models.split import (
    heldout_frame_indices,
    load_eval_inputs,
    load_score,
    load_train,
    make_split,
)
from models.state import StateError, count_elements, load_predictions

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "multimaterial_1_discs_3types.yaml"


def trainer_source(body: str) -> str:
    """A trainer module whose `train` has the body `body`."""
    header = "import math\nimport torch\n\n\ndef train(model, data, settings, report):\n"
    return header + textwrap.indent(textwrap.dedent(body), "    ")


def write_trainer(workspace: Path, body: str) -> None:
    (workspace / "models" / "trainer.py").write_text(trainer_source(body))


def tiny_params(hidden: int = 16, layers: int = 2) -> int:
    """Parameters of the tiny SIREN plus one omega buffer per sine layer."""
    return (3 * hidden + hidden) + (layers - 1) * (hidden * hidden + hidden) + (hidden + 1) + layers


def test_four_steps_end_to_end_on_the_tiny_config(harness_steps):
    prepared = harness_steps.prepare()
    assert prepared.returncode == 0, prepared.stderr
    assert harness_steps.results("prepare")["status"] == "ok"
    record = json.loads((harness_steps.folder("split") / "prepared.json").read_text())
    config = yaml.safe_load(harness_steps.config.read_text())
    assert record == {"config": {"dataset": config["dataset"],
                                 "simulation": config["simulation"]}, "seed": 0}
    trained = harness_steps.train()
    assert trained.returncode == 0, trained.stderr
    assert "step 40/40 loss " in trained.stdout and "[harness] training on cpu" in trained.stdout
    predicted = harness_steps.predict()
    assert predicted.returncode == 0, predicted.stderr
    scored = harness_steps.score(train_seconds=4.0)
    assert scored.returncode == 0, scored.stderr
    body = harness_steps.results("score")
    assert body["status"] == "ok" and body["error"] is None
    assert {*METRIC_KEYS, "heldout_r2"} <= body["metrics"].keys()
    assert all(math.isfinite(value) for value in body["metrics"].values())
    assert body["metrics"]["final_r2"] <= 1.0 and body["metrics"]["heldout_r2"] <= 1.0
    assert body["metrics"]["total_params"] == tiny_params()
    assert body["metrics"]["training_time_s"] == 4.0
    assert body["metrics"]["steps_per_s"] == 40 / 4.0
    assert body["hyperparameters"] == {
        "hidden_dim": 16,
        "n_layers": 2,
        "omega_0": 30.0,
        "learnable_omega": False,
        "learning_rate": 1e-3,
        "steps": 40,
        "frames_per_batch": 2,
        "field": "Jp",
        "n_frames": 8,
    }


def test_the_split_gives_each_step_only_its_part(harness_steps):
    assert harness_steps.prepare(seed=5).returncode == 0
    split = harness_steps.folder("split")
    assert sorted(p.name for p in (split / "eval").iterdir()) == ["inputs.npy"]
    coords, targets = load_train(split / "train")
    inputs = load_eval_inputs(split / "eval")
    truth = load_score(split / "score")
    settings = load_settings(harness_steps.config)
    frames = load_frames(settings.simulation, harness_steps.data_cache)
    training = training_frame_indices(frames.position.shape[0], settings.dataset.n_frames)
    heldout = heldout_frame_indices(training)
    assert len(heldout) > 0 and not set(heldout) & set(training)
    particles = frames.position.shape[1]
    assert coords.shape == (len(training), particles, 3) and targets.shape[:2] == coords.shape[:2]
    assert inputs.shape == ((len(training) + len(heldout)) * particles, 3)
    assert int(truth.heldout.sum()) == len(heldout) * particles
    # shuffled: not in frame order, and a different seed shuffles differently
    assert not np.array_equal(inputs[:particles], coords[0])
    again = harness_steps.folder("again")
    make_split(frames, "Jp", settings.dataset.n_frames, 6).write(again)
    assert not np.array_equal(load_eval_inputs(again / "eval"), inputs)
    # the training targets are the truth of the training points, normalised
    seen = ~truth.heldout
    order = np.lexsort(inputs[seen].T)
    flat = coords.reshape(-1, 3)
    reference = np.lexsort(flat.T)
    assert np.allclose(flat[reference], inputs[seen][order])
    normalised = (truth.truth[seen][order] - truth.mean) / truth.std
    assert np.allclose(targets.reshape(-1, 1)[reference], normalised, atol=1e-5)


def test_nan_loss_stops_training_as_diverged(harness_steps, models_workspace):
    write_trainer(
        models_workspace,
        """
        for step in range(1, 1000):
            report(step, 1.0 if step < 3 else math.nan)
        raise AssertionError("the watchdog should have stopped training")
    """,
    )
    harness_steps.workspace = models_workspace
    assert harness_steps.prepare().returncode == 0
    done = harness_steps.train()
    assert done.returncode == 3, done.stderr
    assert "diverged: loss is nan at step 3" in done.stderr
    assert not (harness_steps.folder("train_out") / STATE_FILE).exists()


def test_nan_weights_score_as_diverged(harness_steps, models_workspace):
    write_trainer(models_workspace, "report(1, 1.0)\nwith torch.no_grad():\n"
                  "    for p in model.parameters():\n        p.fill_(math.nan)\nreturn model\n")
    harness_steps.workspace = models_workspace
    assert harness_steps.all_steps().returncode == 3
    body = harness_steps.results("score")
    assert body["status"] == "diverged" and "not finite" in body["error"]


def test_a_model_that_stores_the_targets_cannot_be_loaded_for_predict(
    harness_steps, models_workspace
):
    write_trainer(models_workspace, "model.register_buffer('table', data.targets.clone())\n"
                  "report(1, 1.0)\nreturn model\n")
    harness_steps.workspace = models_workspace
    done = harness_steps.all_steps()
    assert done.returncode == 1 and "Unexpected key(s) in state_dict: \"table\"" in done.stderr


def test_a_trainer_that_raises_fails_with_its_error(harness_steps, models_workspace):
    write_trainer(models_workspace, 'raise RuntimeError("boom in the trainer")\n')
    harness_steps.workspace = models_workspace
    assert harness_steps.prepare().returncode == 0
    done = harness_steps.train()
    assert done.returncode == 1
    assert "[harness] train: RuntimeError: boom in the trainer" in done.stderr
    assert "Traceback" in done.stderr


def test_the_scorer_imports_no_editable_code(harness_steps, models_workspace):
    assert harness_steps.all_steps(("prepare", "train", "predict")).returncode == 0
    for name in ("siren.py", "trainer.py"):
        (models_workspace / "models" / name).write_text("raise SystemExit('imported!')\n")
    harness_steps.workspace = models_workspace
    assert harness_steps.score().returncode == 0
    assert harness_steps.results("score")["status"] == "ok"


# Each case: a trainer body, the expected exit code of the train step and a fragment of its
# error. They run in one process calling main() again and again, as a zygote child would, so
# this also checks that every call imports the trainer afresh.
CASES = {
    "swallowed": (
        "try:\n    report(1, 1.0); report(2, math.inf)\nexcept Exception:\n    pass\n"
        "return model\n",
        3,
        "loss is inf",
    ),
    "wrapped": (
        "try:\n    report(1, math.nan)\nexcept Exception as exc:\n"
        "    raise RuntimeError('training broke') from exc\n",
        3,
        "loss is nan",
    ),
    "explodes": ("report(1, 1.0)\nreport(2, 2.0e4)\nreturn model\n", 3, "exploded"),
    "returns_none": ("report(1, 1.0)\n", 1, "must return the model"),
    "exits": ("raise SystemExit(0)\n", 1, "SystemExit"),
    "fine": ("report(1, 1.0)\nreturn model\n", 0, None),
}


def test_each_call_of_main_imports_the_editable_code_afresh(harness_steps, models_workspace):
    assert harness_steps.prepare().returncode == 0
    script = textwrap.dedent(f"""
        import contextlib, json, sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(models_workspace)!r})
        from models.harness import main
        sources = json.loads(sys.argv[1])
        trainer = Path({str(models_workspace)!r}) / "models" / "trainer.py"
        for name, source in sources.items():
            trainer.write_text(source)
            with tempfile.TemporaryFile("w+") as errors, contextlib.redirect_stderr(errors):
                code = main(["train", "--config", {str(harness_steps.config)!r}, "--data",
                             {str(harness_steps.folder("split") / "train")!r}, "--out",
                             {str(harness_steps.folder("train_out"))!r}])
                errors.seek(0)
                text = errors.read()
            lines = [l for l in text.splitlines() if l.startswith("[harness]")]
            print("CASE", name, code, lines[-1] if lines else "None", flush=True)
    """)
    # the bodies differ in length, so even a same-second rewrite never reuses stale bytecode
    sources = {name: trainer_source(body) for name, (body, _, _) in CASES.items()}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sources)],
        cwd=models_workspace,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    seen = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("CASE ")}
    assert seen.keys() == CASES.keys(), done.stdout + done.stderr
    for name, (_, code, fragment) in CASES.items():
        _, _, got_code, error = seen[name].split(" ", 3)
        assert int(got_code) == code, seen[name]
        assert (fragment in error) if fragment else error == "None", seen[name]


def test_a_bad_config_exits_2_and_the_trusted_steps_say_why(harness_steps, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(harness_steps.config.read_text().replace("hidden_dim: 16", "hidden_dim: -4"))
    harness_steps.config = config
    assert harness_steps.train().returncode == 2
    assert harness_steps.prepare().returncode == 2
    body = harness_steps.results("prepare")
    assert body["status"] == "failed" and body["error"].startswith("bad config: model.hidden_dim")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda_is_a_bad_config(harness_steps):
    assert harness_steps.prepare().returncode == 0
    done = harness_steps.train("--device", "cuda")
    assert done.returncode == 2 and "CUDA is not available" in done.stderr


def test_malformed_state_and_predictions_are_refused_by_the_scorer(tmp_path):
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": np.zeros((3, 4), np.float32), "table": np.zeros(10, np.int64)}, str(good))
    assert count_elements(good) == 22
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(good.read_bytes() + b"hidden tensor bytes")
    with pytest.raises(StateError, match="belong to no tensor"):
        count_elements(padded)
    with pytest.raises(StateError, match="too short"):
        (tmp_path / "short").write_bytes(b"abc")
        count_elements(tmp_path / "short")
    with pytest.raises(StateError, match="saved no model state"):
        count_elements(tmp_path / "missing")
    named = tmp_path / "named.safetensors"
    save_file({"w": np.zeros(3, np.float32), "x" * 40: np.zeros(1, np.float32)}, str(named))
    assert count_elements(named) == 3 + 1 + 2  # the 8 characters past 32 count as 2
    for bad, why in (({"w": np.zeros(0, np.float32)}, "empty"),
                     ({"w/../x": np.zeros(1, np.float32)}, "not a tensor name")):
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(StateError, match=why):
            count_elements(tmp_path / "bad.safetensors")
    save_file({"w": np.zeros(1, np.float32)}, str(tmp_path / "meta.safetensors"),
              metadata={"table": "data hidden here"})
    with pytest.raises(StateError, match="carries metadata"):
        count_elements(tmp_path / "meta.safetensors")
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(StateError, match="unreadable"):
        load_predictions(objects, (1,))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 1), np.float32))
    with pytest.raises(StateError, match="expected"):
        load_predictions(wrong, (5, 1))


def check(run_harness, path: Path) -> tuple[int, list[dict]]:
    done = run_harness("--check", path)
    return done.returncode, json.loads(done.stdout)["errors"]


def test_check_accepts_the_default_and_tiny_configs(run_harness, tiny_config):
    assert check(run_harness, DEFAULT_CONFIG) == (0, [])
    assert check(run_harness, tiny_config) == (0, [])


@pytest.mark.parametrize(
    ("old", "new", "loc", "fragment"),
    [
        ("  steps: 40", "  steps: 40\n  lr: 0.1", ["training", "lr"], "unknown key"),
        ("hidden_dim: 16", "hidden_dim: big", ["model", "hidden_dim"], "integer"),
        (
            "learning_rate: 1.0e-3",
            "learning_rate: '0.001'",
            ["training", "learning_rate"],
            "number",
        ),
        ("field: Jp", "field: Jq", ["dataset", "field"], "'Jp'"),
        ("  n_frames: 8\n", "  n_frames: 80\n", [], "exceeds"),
        ("device: cpu", "device: tpu", ["training", "device"], "pattern"),
    ],
)
def test_check_names_the_bad_key(run_harness, tiny_config, tmp_path, old, new, loc, fragment):
    text = tiny_config.read_text()
    assert old in text
    config = tmp_path / "bad.yaml"
    config.write_text(text.replace(old, new, 1))
    code, errors = check(run_harness, config)
    assert code == 2 and len(errors) == 1
    assert errors[0]["loc"] == loc and fragment in errors[0]["msg"]


def test_check_survives_unreadable_and_non_mapping_files(run_harness, tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- just\n- a list\n")
    assert check(run_harness, listing)[0] == 2
    assert check(run_harness, tmp_path / "missing.yaml")[0] == 2


def test_check_does_not_import_torch(tiny_config):
    script = (
        "import sys\n"
        "from models.harness import main\n"
        f"assert main(['--check', {str(tiny_config)!r}]) == 0\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_side_file_left_by_the_train_step_fails_the_score(harness_steps):
    assert harness_steps.all_steps(("prepare", "train", "predict")).returncode == 0
    (harness_steps.folder("train_out") / "table.npz").write_bytes(b"the training data")
    assert harness_steps.score().returncode == 1
    body = harness_steps.results("score")
    assert body["status"] == "failed" and "left table.npz beside state.safetensors" in body["error"]
