"""The run harness as a real subprocess: results, exit codes, divergence, failures, --check."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models.harness import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "multimaterial_1_discs_3types.yaml"


def results_of(path: Path) -> dict:
    return json.loads(path.read_text())


def trainer_source(body: str) -> str:
    """A trainer module whose `train` has the body `body`."""
    header = "import math\nimport torch\n\n\ndef train(model, data, settings, report):\n"
    return header + textwrap.indent(textwrap.dedent(body), "    ")


def write_trainer(workspace: Path, body: str) -> None:
    (workspace / "models" / "trainer.py").write_text(trainer_source(body))


def test_end_to_end_on_the_tiny_config(run_harness, tiny_config, tmp_path):
    results = tmp_path / "out" / "results.json"
    done = run_harness("--config", tiny_config, "--results", results)
    assert done.returncode == 0, done.stderr
    body = results_of(results)
    assert body["status"] == "ok" and body["error"] is None
    assert set(METRIC_KEYS) <= body["metrics"].keys()
    assert all(math.isfinite(body["metrics"][key]) for key in METRIC_KEYS)
    assert body["metrics"]["final_r2"] <= 1.0
    assert body["metrics"]["total_params"] == (3 * 16 + 16) + (16 * 16 + 16) + (16 + 1)
    assert body["metrics"]["steps_per_s"] > 0
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
    for line in (
        "[harness] dataset ready",
        "[harness] training on cpu",
        "step 40/40 loss ",
        "[harness] evaluating",
        "[harness] result: status ok",
    ):
        assert line in done.stdout


def test_nan_loss_stops_the_run_as_diverged(run_harness, tiny_config, models_workspace, tmp_path):
    write_trainer(
        models_workspace,
        """
        for step in range(1, 1000):
            report(step, 1.0 if step < 3 else math.nan)
        raise AssertionError("the watchdog should have stopped training")
    """,
    )
    results = tmp_path / "results.json"
    done = run_harness("--config", tiny_config, "--results", results, cwd=models_workspace)
    assert done.returncode == 3, done.stderr
    body = results_of(results)
    assert body["status"] == "diverged" and "loss is nan at step 3" in body["error"]
    assert body["metrics"]["total_params"] > 0 and "final_r2" not in body["metrics"]


def test_trainer_that_raises_fails_with_its_error(
    run_harness, tiny_config, models_workspace, tmp_path
):
    write_trainer(models_workspace, 'raise RuntimeError("boom in the trainer")\n')
    results = tmp_path / "results.json"
    done = run_harness("--config", tiny_config, "--results", results, cwd=models_workspace)
    assert done.returncode == 1
    body = results_of(results)
    assert body["status"] == "failed" and body["error"] == "RuntimeError: boom in the trainer"
    assert "Traceback" in done.stderr and "boom in the trainer" in done.stderr


# Each case: a trainer body, the expected exit code and a fragment of the error. They run in
# one process calling main() again and again, as a zygote child would, so this also checks
# that every call imports the trainer afresh.
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
    "nan_weights": (
        "report(1, 1.0)\nwith torch.no_grad():\n    for p in model.parameters():\n"
        "        p.fill_(math.nan)\nreturn model\n",
        3,
        "not finite",
    ),
    "returns_none": ("report(1, 1.0)\n", 1, "must return the model"),
    "exits": ("raise SystemExit(0)\n", 1, "SystemExit"),
    "fine": ("report(1, 1.0)\nreturn model\n", 0, None),
}


def test_each_call_of_main_imports_the_editable_code_afresh(
    tiny_config, models_workspace, models_data_cache
):
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(models_workspace)!r})
        from models.harness import main
        sources = json.loads(sys.argv[1])
        trainer = Path({str(models_workspace)!r}) / "models" / "trainer.py"
        for name, source in sources.items():
            trainer.write_text(source)
            results = Path(sys.argv[2]) / (name + ".json")
            code = main(["--config", {str(tiny_config)!r}, "--results", str(results),
                         "--data-cache", {str(models_data_cache)!r}])
            print("CASE", name, code, json.loads(results.read_text())["error"], flush=True)
    """)
    # the bodies differ in length, so even a same-second rewrite never reuses stale bytecode
    sources = {name: trainer_source(body) for name, (body, _, _) in CASES.items()}
    out_dir = models_workspace / "out"
    out_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sources), str(out_dir)],
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


def test_bad_config_in_a_run_exits_2_with_a_results_file(run_harness, tiny_config, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(tiny_config.read_text().replace("hidden_dim: 16", "hidden_dim: -4"))
    results = tmp_path / "results.json"
    done = run_harness("--config", config, "--results", results)
    assert done.returncode == 2
    body = results_of(results)
    assert body["status"] == "failed" and body["error"].startswith("bad config: model.hidden_dim")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda_is_a_bad_config(run_harness, tiny_config, tmp_path):
    results = tmp_path / "results.json"
    done = run_harness("--config", tiny_config, "--results", results, "--device", "cuda")
    assert done.returncode == 2
    assert "CUDA is not available" in results_of(results)["error"]


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
