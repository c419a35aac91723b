"""Fits the model to the field: Adam on the mean squared error over random batches of frames.

EDITABLE by the agent. The harness calls `train(model, data, settings, report)` and evaluates
the model this returns itself. `data.coords` is (frames, particles, 3), `data.targets` is
(frames, particles, channels), both normalised and on the training device; `settings` is the
config's training section; `report(step, loss)` must be called as training goes (it stops a
diverging run).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from models.data import TrainingData
from models.settings import TrainingSettings


def train(
    model: nn.Module,
    data: TrainingData,
    settings: TrainingSettings,
    report: Callable[[int, float], None],
) -> nn.Module:
    """Train `model` for `settings.steps` steps and return it."""
    coords, targets = data.coords, data.targets
    n_frames = coords.shape[0]
    frames_per_batch = min(settings.frames_per_batch, n_frames)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    model.train()
    start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        frames = torch.randperm(n_frames, generator=generator)[:frames_per_batch]
        frames = frames.to(coords.device)
        inputs = coords[frames].reshape(-1, coords.shape[-1])
        target = targets[frames].reshape(-1, targets.shape[-1])
        prediction = model(inputs)
        loss = ((prediction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        report(step, loss_value)
        if step % settings.log_every == 0 or step == settings.steps:
            rate = step / (time.perf_counter() - start)
            print(
                f"step {step}/{settings.steps} loss {loss_value:.3e} steps/s {rate:.1f}", flush=True
            )
    return model
