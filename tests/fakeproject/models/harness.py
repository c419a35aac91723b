"""A fast stand-in for the real harness (no torch): the same four steps, exit codes and
results channel (fd 3, prepare and score only).

The score comes from the editable files (train writes it into its state, predict passes it
on), so tests can see which node's code ran."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def check(path):
    config = yaml.safe_load(Path(path).read_text())
    known = {"learning_rate", "steps", "seed", "step_sleep"}
    unknown = sorted(set(config.get("training", {})) - known)
    errors = [{"loc": ["training", key], "msg": "unknown key"} for key in unknown]
    print(json.dumps({"errors": errors}))
    return 2 if errors else 0


def report(metrics):
    with os.fdopen(3, "w") as channel:
        channel.write(json.dumps({"status": "ok", "metrics": metrics, "hyperparameters": {},
                                  "error": None}))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("step", nargs="?")
    parser.add_argument("--check")
    for name in ("--config", "--data", "--out", "--state", "--predictions", "--data-cache",
                 "--split", "--seed", "--device", "--train-seconds"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.step == "prepare":
        for part in ("train", "eval", "score"):
            (Path(args.split) / part).mkdir(parents=True, exist_ok=True)
        report({})
    elif args.step == "train":
        from models import siren, trainer

        Path("harness.started").write_text("train")
        steps = config["training"]["steps"]
        for step in range(1, steps + 1):
            print(f"step {step}/{steps} loss {1.0 / step:.3e}", flush=True)
            time.sleep(config["training"].get("step_sleep", 0.0))
        r2 = trainer.fit(config["training"]) + siren.BONUS
        (Path(args.out) / "state.json").write_text(json.dumps({"r2": r2}))
    elif args.step == "predict":
        state = json.loads((Path(args.state) / "state.json").read_text())
        (Path(args.out) / "predictions.json").write_text(json.dumps(state))
    elif args.step == "score":
        r2 = json.loads((Path(args.predictions) / "predictions.json").read_text())["r2"]
        report({"final_r2": r2, "pearson_r2": r2, "slope": 1.0, "final_mse": 1.0 - r2,
                "heldout_r2": r2, "training_time_s": float(args.train_seconds or 0.0),
                "total_params": 10, "steps_per_s": 100.0})
    else:
        print(f"unknown step {args.step!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
