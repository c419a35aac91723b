"""A benchmark harness: a handful of trivial torch steps; reports its own work time."""

import time

import torch

from models import fakekit

if __name__ == "__main__":
    started = time.perf_counter()
    config, results = fakekit.args()
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(config.get("steps", 5)):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    print(f"loss {loss.item():.4f}")
    fakekit.write_results(
        results, "ok", {"loss": loss.item(), "work_s": time.perf_counter() - started}
    )
