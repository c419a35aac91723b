"""A torch-free harness whose four steps do what the config's `behaviour` says, so tests can
see what each step was given, what it could do and what proctor made of it."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def report(metrics: dict) -> None:
    with os.fdopen(3, "w") as channel:
        channel.write(json.dumps({"status": "ok", "metrics": metrics, "hyperparameters": {},
                                  "error": None}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    for name in ("--config", "--data", "--out", "--state", "--predictions", "--data-cache",
                 "--split", "--seed", "--device", "--train-seconds"):
        parser.add_argument(name)
    args = parser.parse_args()
    behaviour = yaml.safe_load(Path(args.config).read_text())["behaviour"].get(args.step, {})
    print(f"{args.step}: fd 3 is {'open' if _open(3) else 'closed'}", flush=True)
    if behaviour.get("fill_tmp_mb"):
        chunk = b"x" * 2**20
        with open("/tmp/fill", "wb") as handle:
            for written in range(behaviour["fill_tmp_mb"]):
                try:
                    handle.write(chunk)
                    handle.flush()
                except OSError as exc:
                    print(f"{args.step}: /tmp full after {written} MB: {exc.strerror}")
                    return 1
    if behaviour.get("fail"):
        print(f"{args.step} failing on purpose{behaviour.get('say', '')}", file=sys.stderr)
        return 1
    if args.step == "prepare":
        for part in ("train", "eval", "score"):
            (Path(args.split) / part).mkdir()
        (Path(args.split) / "train" / "x").write_text("1")
        config = yaml.safe_load(Path(args.config).read_text())
        record = {"config": {"data": config.get("data")}, "seed": int(args.seed)}
        (Path(args.split) / "prepared.json").write_text(json.dumps(record))
        report({})
    elif args.step == "train":
        print('{"status": "ok", "metrics": {"final_r2": 1.0}}', flush=True)  # a fake result
        placement = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES",
                                                             "OMP_NUM_THREADS")}
        print(f"train: device {args.device} {json.dumps(placement, sort_keys=True)}",
              flush=True)
        time.sleep(behaviour.get("sleep", 0))
        Path("models", "trainer_was_here").write_text("train")
        (Path(args.out) / "state").write_text(str(behaviour.get("value", 0.5)))
        if behaviour.get("symlink"):
            os.symlink(str(Path(args.data) / "x"), Path(args.out) / "link")
    elif args.step == "predict":
        seen = Path("models", "trainer_was_here").exists()
        print(f"predict: the train step's workspace file is {'visible' if seen else 'gone'}")
        value = (Path(args.state) / "state").read_text()
        (Path(args.out) / "predictions").write_text(value)
    elif args.step == "score":
        value = float((Path(args.predictions) / "predictions").read_text())
        report({"final_r2": value, "training_time_s": float(args.train_seconds)})
    return 0


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
