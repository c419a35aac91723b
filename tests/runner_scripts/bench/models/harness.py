"""A benchmark harness: a handful of trivial torch steps; reports its own work time on the
results channel when it holds one, and in ./work_s.txt (what an untrusted run can leave)."""

import time
from pathlib import Path

import torch

from models import fakekit

if __name__ == "__main__":
    started = time.perf_counter()
    config = fakekit.args()
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(config.get("steps", 5)):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    print(f"loss {loss.item():.4f}")
    work_s = time.perf_counter() - started
    Path("work_s.txt").write_text(f"{work_s}\n")
    fakekit.write_results("ok", {"loss": loss.item(), "work_s": work_s})
