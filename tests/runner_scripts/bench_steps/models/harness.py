"""A benchmark harness with the four steps of the run contract and no work in them: each
step imports torch (as the real train and predict steps do) and does what the contract asks
of it, so a node's wall time is the runner's and the sandbox's overhead."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch  # noqa: F401 (what a real step pays for in subprocess mode)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    for name in ("--config", "--data", "--out", "--state", "--predictions", "--data-cache",
                 "--split", "--seed", "--device", "--train-seconds"):
        parser.add_argument(name)
    args = parser.parse_args()
    if args.step == "prepare":
        for part in ("train", "eval", "score"):
            (Path(args.split) / part).mkdir(exist_ok=True)
        record = {"config": {}, "seed": int(args.seed)}
        (Path(args.split) / "prepared.json").write_text(json.dumps(record))
    elif args.step in ("train", "predict"):
        (Path(args.out) / "output").write_text(args.step)
    if args.step in ("prepare", "score"):
        with os.fdopen(3, "w") as channel:
            channel.write(json.dumps({"status": "ok", "metrics": {"final_r2": 0.5}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
