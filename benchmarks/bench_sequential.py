"""Sequential certification against fixed n = 100 000: forward passes and wall time.

Run (pytest-benchmark; one round each, the work is minutes long)::

    python -m pytest benchmarks/bench_sequential.py --benchmark-only -p no:cacheprovider -s

or, for the README table only: ``python benchmarks/bench_sequential.py``. Environment:

* ``CERTBENCH_SEQ_CHECKPOINT`` — case (b)'s model (default ``/tmp/seq/smooth``), trained with
  ``python -m bench.cli train --dataset fashion-mnist --model wk-small --defense
  randomized-smoothing --param sigma=0.25 --epochs 5 --batch-size 128 --out /tmp/seq/smooth``
  (the command then predicts the whole test set with n = 100 000; the checkpoint is written
  before that, and the prediction may be interrupted);
* ``CERTBENCH_SEQ_CACHE`` — where case (b)'s fixed-n draws are kept (default
  ``/tmp/certbench-seq``); ``CERTBENCH_SEQ_IMAGES`` — test images (default 500).

Cases (the issue's):

(a) **linear oracle**: a two-class linear base classifier whose smoothed classifier and exact
    radius are known in closed form (``p_A = Phi(margin / sigma)``, ``R = |margin|``), with a
    spread of class probabilities like a trained model's (10% misclassified, the rest with
    ``1 - p`` log-uniform in [1e-6, 1/2]); 200 inputs, both methods on the engine.
(b) **the Fashion-MNIST board's smoothing model** (wk-small, sigma = 0.25, 5 epochs) on the
    first 500 test images at the board's ℓ2 radii ∪ thresholds.

Fixed n = 100 000 on (b) costs about half an hour on 2 loaded cores, so it runs once: the
estimation draws are taken block by block (the very blocks CERTIFY with n = 100 000 takes;
their wall time is the fixed-n time) and their per-block counts are cached. Fixed-n CERTIFY is
computed from their sums (checked against :func:`bench.sampling.smoothed_certify` on a few
images), and sequential CERTIFY, whose draws are a prefix of the same blocks, is *replayed*
from them exactly for every confidence sequence, with and without true labels; the default
sequence is also run for real on the engine, timed, and checked equal to its replay. Counts
(draws, forward passes) do not depend on the machine; wall times do (note the load).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from bench.certificates import smoothing_radius
from bench.confseq import SEQUENCES
from bench.errors import ConfigError
from bench.sampling import ESTIMATION, SELECTION, smoothed_certify, smoothed_certify_sequential
from bench.sampling.engine import sample_streams
from bench.sampling.sequential import DEFAULT_SEQUENCE, certify_rounds

SIGMA = 0.25
ALPHA = 0.001
N_FIXED = 100_000
N0 = 100
BLOCK = 1000
BOARD_RADII = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)  # configs/fashion-mnist.toml: radii ∪ thresholds
CHECKPOINT = Path(os.environ.get("CERTBENCH_SEQ_CHECKPOINT", "/tmp/seq/smooth"))
CACHE = Path(os.environ.get("CERTBENCH_SEQ_CACHE", "/tmp/certbench-seq"))
IMAGES = int(os.environ.get("CERTBENCH_SEQ_IMAGES", "500"))
SEED = 0


# --------------------------------------------------------------------------- shared pieces
def guaranteed(labels: np.ndarray, radius: np.ndarray, y: np.ndarray) -> dict[float, float]:
    """Guaranteed accuracy at each board radius, in percent."""
    ok = labels == y
    return {r: 100.0 * float(np.mean(ok & (radius >= r))) for r in BOARD_RADII}


def fixed_from_totals(
    selection: np.ndarray, totals: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cohen's CERTIFY from selection counts and estimation totals (numpy)."""
    c_hat = selection.argmax(axis=1)
    n_a = totals[np.arange(len(c_hat)), c_hat]
    radius = np.asarray(smoothing_radius(n_a, n, SIGMA, ALPHA))
    certified = radius >= 0
    return np.where(certified, c_hat, -1), np.where(certified, radius, 0.0)


def replay_draw(blocks: np.ndarray):
    """A :data:`bench.sampling.sequential.Draw` reading cached per-block counts
    ``(N, blocks, K)``: the sums the engine would return for those blocks."""
    cum = np.concatenate([np.zeros_like(blocks[:, :1]), np.cumsum(blocks, axis=1)], axis=1)

    def draw(positions: np.ndarray, start: int, count: int) -> np.ndarray:
        b0, b1 = start // BLOCK, -(-(start + count) // BLOCK)
        return (cum[positions, b1] - cum[positions, b0]).astype(np.int64)

    return draw


def sequential_rows(
    selection: np.ndarray, blocks: np.ndarray, y: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Replay sequential CERTIFY for every sequence, with selection and with true labels."""
    rows = {}
    draw = replay_draw(blocks)
    for seq in SEQUENCES:
        for mode, tested, extra in (
            ("selection", selection.argmax(axis=1), N0),
            ("labels", y, 0),
        ):
            labels, radius, spent = certify_rounds(
                draw,
                tested,
                num_classes=blocks.shape[2],
                sigma=SIGMA,
                radii=BOARD_RADII,
                alpha=ALPHA,
                max_n=N_FIXED,
                block_size=BLOCK,
                sequence=seq,
            )
            rows[f"sequential {seq}, {mode}"] = {
                "labels": labels,
                "radius": radius,
                "draws": spent + extra,
            }
    return rows


def table(rows: dict[str, dict[str, Any]], y: np.ndarray) -> str:
    """The README table: mean draws, the ratio to fixed n, guaranteed accuracy per radius."""
    base = float(np.mean(rows["fixed n = 100 000"]["draws"]))
    head = "| method | mean draws | fewer than fixed | " + " | ".join(
        f"r = {r:g}" for r in BOARD_RADII
    )
    lines = [head + " | wall time |", "|" + "---|" * (len(BOARD_RADII) + 4)]
    for name, row in rows.items():
        ga = guaranteed(row["labels"], row["radius"], y)
        mean = float(np.mean(row["draws"]))
        wall = row.get("seconds")
        cells = " | ".join(f"{ga[r]:.1f}" for r in BOARD_RADII)
        wall_cell = "" if wall is None else f"{wall:.1f} s" if wall < 10 else f"{wall:.0f} s"
        lines.append(f"| {name} | {mean:.0f} | {base / mean:.1f}x | {cells} | {wall_cell} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- case (a)
def linear_oracle(num: int = 200, seed: int = 0) -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    """A two-class linear base classifier on 1x1x4 inputs and inputs whose ``p_A`` follow
    the spread of the module doc; returns the model, the inputs and the exact radii
    ``(margin, signed: class 0 wins where > 0)``."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(num) < 0.1
    tail = 10 ** rng.uniform(-6.0, np.log10(0.5), num)  # 1 - p_A, log-uniform
    p0 = np.where(wrong, rng.uniform(0.0, 0.5, num), 1.0 - tail)
    margin = SIGMA * stats.norm.ppf(p0)  # signed distance to the decision boundary
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.zeros(num, 1, 1, 4)
    x[:, 0, 0, 0] = torch.from_numpy(margin)  # w = (1, 0, 0, 0) - (-1, 0, 0, 0): |w| = sqrt 2
    # logit gap 2 x0 vs noise 2 sigma z0: class 0 iff x0 + sigma z0 > 0: p0 = Phi(x0 / sigma)
    return model, x, margin


def case_linear(method: str) -> dict[str, Any]:
    """Case (a) with ``method`` ``"fixed"`` or the name of a confidence sequence."""
    model, x, margin = linear_oracle()
    y = np.zeros(x.shape[0], dtype=np.int64)
    t0 = time.perf_counter()
    if method == "fixed":
        labels, radius = smoothed_certify(
            model, x, sigma=SIGMA, n0=N0, n=N_FIXED, alpha=ALPHA, num_classes=2, seed=SEED
        )
        draws = np.full(x.shape[0], N0 + N_FIXED)
    else:
        labels, radius, d = smoothed_certify_sequential(
            model, x, sigma=SIGMA, radii=BOARD_RADII, alpha=ALPHA, max_n=N_FIXED,
            num_classes=2, seed=SEED, sequence=method,
        )  # fmt: skip
        draws = d.numpy()
    seconds = time.perf_counter() - t0
    lab, rad = labels.numpy(), radius.numpy()
    exact = np.abs(x[:, 0, 0, 0].double().numpy())  # the radius of the float32 inputs
    truth = np.where(margin > 0, 0, 1)  # the smoothed classifier's prediction
    wrong = int(np.sum((lab != -1) & ((lab != truth) | (rad > exact))))
    return {"labels": lab, "radius": rad, "draws": draws, "seconds": seconds, "y": y,
            "unsound": wrong}  # fmt: skip


# --------------------------------------------------------------------------- case (b)
def _fashion() -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    from bench.assembly import load_defense
    from bench.data import load_dataset

    if not CHECKPOINT.with_suffix(".safetensors").is_file():
        pytest.skip(f"no checkpoint at {CHECKPOINT} (see the module docstring)")
    try:
        ds = load_dataset("fashion-mnist", None, limit_test=IMAGES)
    except (ConfigError, OSError) as exc:  # the data files are optional here
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    d, _ = load_defense(CHECKPOINT, input_shape=ds.input_shape, num_classes=ds.num_classes)
    d.model_.eval()
    return d.base_classifier_, ds.x_test[:IMAGES], ds.y_test[:IMAGES].numpy()


def fashion_draws(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Selection counts ``(N, K)`` and per-block estimation counts ``(N, 100, K)`` of fixed
    n = 100 000 for ``x``, cached under ``CERTBENCH_SEQ_CACHE`` (keyed by the checkpoint)."""
    from bench.noise import NoiseLayer

    stamp = CHECKPOINT.with_suffix(".safetensors").stat()
    key = f"{stamp.st_size}-{int(stamp.st_mtime)}-{x.shape[0]}-{SEED}"
    path = CACHE / f"fashion-{key}.npz"
    if path.is_file():
        data = np.load(path)
        return {k: data[k] for k in data.files}
    CACHE.mkdir(parents=True, exist_ok=True)
    noisy = nn.Sequential(NoiseLayer("gaussian", SIGMA), model)
    common = dict(num_classes=10, seed=SEED, indices=None, batch_size=None, block_size=BLOCK,
                  row_bytes_owner=model)  # fmt: skip
    t0 = time.perf_counter()
    (sel,) = sample_streams(noisy, x, [(SELECTION, N0)], **common)
    blocks = []
    for b in range(N_FIXED // BLOCK):
        (est,) = sample_streams(noisy, x, [(ESTIMATION, BLOCK)], first_block=b, **common)
        blocks.append(est.counts.numpy().astype(np.int32))
        print(f"\rfixed-n draws: block {b + 1}/{N_FIXED // BLOCK}", end="", file=sys.stderr)
    seconds = time.perf_counter() - t0
    out = {
        "selection": sel.counts.numpy(),
        "blocks": np.stack(blocks, axis=1),
        "seconds": np.array(seconds),
    }
    np.savez_compressed(path, **out)
    return out


def case_fashion() -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    model, x, y = _fashion()
    cached = fashion_draws(model, x)
    sel, blocks = cached["selection"], cached["blocks"]
    labels, radius = fixed_from_totals(sel, blocks.sum(axis=1), N_FIXED)
    rows: dict[str, dict[str, Any]] = {
        "fixed n = 100 000": {
            "labels": labels,
            "radius": radius,
            "draws": np.full(len(y), N0 + N_FIXED),
            "seconds": float(cached["seconds"]),
        }
    }
    # the cached blocks are CERTIFY's own draws: check on a few images
    few = 3
    lab, rad = smoothed_certify(model, x[:few], sigma=SIGMA, n0=N0, n=N_FIXED, alpha=ALPHA,
                                num_classes=10, seed=SEED)  # fmt: skip
    assert np.array_equal(lab.numpy(), labels[:few]), "cached draws are not CERTIFY's"
    assert np.allclose(rad.numpy(), radius[:few], rtol=0, atol=0), "cached draws are not CERTIFY's"
    replayed = sequential_rows(sel, blocks, y)
    for mode, given in (("selection", None), ("labels", torch.from_numpy(y))):
        t0 = time.perf_counter()
        lab, rad, draws = smoothed_certify_sequential(
            model, x, sigma=SIGMA, radii=BOARD_RADII, alpha=ALPHA, max_n=N_FIXED, n0=N0,
            labels=given, num_classes=10, seed=SEED,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        row = replayed[f"sequential {DEFAULT_SEQUENCE}, {mode}"]
        assert np.array_equal(row["labels"], lab.numpy()), "replay differs from the engine run"
        assert np.array_equal(row["radius"], rad.numpy()), "replay differs from the engine run"
        assert np.array_equal(row["draws"], draws.numpy()), "replay differs from the engine run"
        row["seconds"] = seconds
    rows.update(replayed)
    return rows, y


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("method", ["fixed", *SEQUENCES])
def test_linear_oracle(benchmark, method: str) -> None:
    """Case (a): forward passes and wall time of each method on the linear oracle."""
    out = benchmark.pedantic(case_linear, args=(method,), rounds=1, iterations=1)
    benchmark.extra_info["mean_draws"] = float(np.mean(out["draws"]))
    benchmark.extra_info["guaranteed_accuracy"] = guaranteed(out["labels"], out["radius"], out["y"])
    assert out["unsound"] == 0, "a certificate exceeds the exact radius"


def test_fashion_board(benchmark) -> None:
    """Case (b): the Fashion-MNIST board's smoothing model, both methods (module doc)."""
    rows, y = benchmark.pedantic(case_fashion, rounds=1, iterations=1)
    text = table(rows, y)
    print("\n" + text)
    fixed = rows["fixed n = 100 000"]
    seq = rows[f"sequential {DEFAULT_SEQUENCE}, selection"]
    ga_f = guaranteed(fixed["labels"], fixed["radius"], y)
    ga_s = guaranteed(seq["labels"], seq["radius"], y)
    ratio = float(np.mean(fixed["draws"]) / np.mean(seq["draws"]))
    benchmark.extra_info.update(
        {"ratio": ratio, "table": text, "gap_points": {r: ga_s[r] - ga_f[r] for r in BOARD_RADII}}
    )
    (CACHE / "table.md").write_text(text + "\n")
    assert all(abs(ga_s[r] - ga_f[r]) <= 0.5 for r in BOARD_RADII), "not within 0.5 point"
    assert ratio >= 10.0, f"only {ratio:.1f}x fewer forward passes"


if __name__ == "__main__":
    rows, y = case_fashion()
    lin = {f"{m}": case_linear(m) for m in ("fixed", "sequential")}
    print(table(rows, y))
    print()
    lin_rows = {
        "fixed n = 100 000": lin["fixed"],
        f"sequential {DEFAULT_SEQUENCE}, selection": lin["sequential"],
    }
    print(table(lin_rows, lin["fixed"]["y"]))
    summary = {k: {"mean_draws": float(np.mean(v["draws"]))} for k, v in rows.items()}
    (CACHE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"certificates beyond the exact radius (linear): fixed {lin['fixed']['unsound']}, "
        f"sequential {lin['sequential']['unsound']}"
    )
