"""Training-step overhead of PixelDP against the undefended model (pytest-benchmark).

    python -m pytest benchmarks/bench_train_step.py --benchmark-only

One step = ``defense.training_loss`` + backward + Adam step + ``defense.after_step`` on
wk-small (1×28×28), batch 128, one torch thread. The benchmark group puts the four variants
side by side; compare their ratios to ``undefended`` (measured in the same process).
"""

from __future__ import annotations

import pytest
import torch

from bench.assembly import build_defense
from bench.training import TrainSettings, _optimizer
from defenses.base import TrainProgress

VARIANTS = {
    "undefended": ("undefended", {}),
    "pixeldp-image": ("pixeldp", {"placement": "image"}),
    "pixeldp-first-layer-bound": ("pixeldp", {"placement": "first-layer"}),
    "pixeldp-first-layer-optimise": (
        "pixeldp",
        {"placement": "first-layer", "sensitivity_control": "optimise"},
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, variant):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    name, params = VARIANTS[variant]
    d = build_defense(name, params, "wk-small", input_shape=(1, 28, 28), num_classes=10)
    opt = _optimizer(list(d.model_.parameters()), TrainSettings())
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    d.model_.train()
    state = {"step": 0}

    def step():
        prog = TrainProgress(step=state["step"], total_steps=10**6, epoch=0, epochs=1)
        loss = d.training_loss(x, y, prog)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d.after_step(prog)
        state["step"] += 1

    benchmark.group = "train-step wk-small b128"
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)
