"""A fast stand-in for the real harness (no torch): same contract, same exit codes.

The score comes from the editable files, so tests can see which node's code ran."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--results")
    parser.add_argument("--check")
    parser.add_argument("--data-cache")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    if args.check:
        config = yaml.safe_load(Path(args.check).read_text())
        known = {"learning_rate", "steps", "seed", "step_sleep"}
        unknown = sorted(set(config.get("training", {})) - known)
        errors = [{"loc": ["training", key], "msg": "unknown key"} for key in unknown]
        print(json.dumps({"errors": errors}))
        return 2 if errors else 0
    config = yaml.safe_load(Path(args.config).read_text())
    from models import siren, trainer

    Path("harness.pid").write_text(str(os.getpid()))
    steps = config["training"]["steps"]
    for step in range(1, steps + 1):
        print(f"step {step}/{steps} loss {1.0 / step:.3e}", flush=True)
        time.sleep(config["training"].get("step_sleep", 0.0))
    r2 = trainer.fit(config["training"]) + siren.BONUS
    metrics = {"final_r2": r2, "pearson_r2": r2, "slope": 1.0, "final_mse": 1.0 - r2,
               "training_time_s": 0.01, "total_params": 10, "steps_per_s": 100.0}
    Path(args.results).write_text(json.dumps(
        {"status": "ok", "metrics": metrics, "hyperparameters": {}, "error": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
