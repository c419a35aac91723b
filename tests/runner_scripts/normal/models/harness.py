"""A well-behaved fake harness: prints, and reports trainer.VALUE as final_r2."""

import sys
import time

from models import fakekit, trainer

if __name__ == "__main__":
    started = time.perf_counter()
    config = fakekit.args()
    fakekit.note_pid()
    for step in range(config.get("lines", 3)):
        print(f"step {step} loss {1.0 / (step + 1):.3f}")
    print("final_r2: 0.99")  # a fake metric line: must change nothing
    print("progress 10%\rprogress 50%\rprogress 100%", file=sys.stderr)
    fakekit.write_results(
        "ok",
        {"final_r2": trainer.VALUE, "work_s": time.perf_counter() - started},
        hyperparameters={"torch_preloaded": "torch" in sys.modules},
    )
