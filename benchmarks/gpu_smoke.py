"""GPU smoke check: the CUDA code paths that the CPU-only test machines cannot reach.

Run on a machine with a CUDA device, from the repository root::

    python benchmarks/gpu_smoke.py [--out DIR]

It checks, on ``cuda``:

1. the noise engine's seeding contract: counts, labels and radii of ``smoothed_certify`` do
   not depend on the batch size, and two examples never share noise (CUDA's Philox generator
   takes the full 64-bit block seed);
2. sequential certification gives the same answers whatever the batch size;
3. every built-in defense trains, certifies and is attacked through the pipeline
   (``configs/quick.toml`` with ``--device cuda``), and its numbers are close to the CPU
   board's (they are not equal: CUDA's noise and float order differ);
4. throughput of Monte Carlo certification on the GPU (draws per second).

Results print as lines ``CHECK <name>: ok|FAIL ...`` and a JSON summary under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # --device cpu runs the same checks on the CPU (a dry run of this script)
sys.path.insert(0, str(ROOT))


def _cnn(seed: int) -> torch.nn.Module:
    from bench.models import create_model

    torch.manual_seed(seed)
    return create_model("cnn", input_shape=(1, 8, 8), num_classes=10).to(DEVICE).eval()


def check_seeding(results: dict) -> None:
    from bench.sampling import ESTIMATION, sample, smoothed_certify

    model = _cnn(0)
    x = torch.rand(40, 1, 8, 8, device=DEVICE)
    runs = [
        smoothed_certify(model, x, sigma=0.25, n0=50, n=2000, alpha=0.001, seed=7, batch_size=b)
        for b in (None, 333, 4000)
    ]
    same = all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][1], r[1]) for r in runs[1:])
    # two different examples at the same position of the input never share noise
    from bench.noise import NoiseLayer

    noisy = torch.nn.Sequential(NoiseLayer("gaussian", 1.0), torch.nn.Flatten()).to(DEVICE)
    ids = torch.tensor([173139, 384763, 292422, 256274])
    z = torch.zeros(4, 1, 4, 4, device=DEVICE)
    s = sample(noisy, z, 8, num_classes=16, seed=0, indices=ids, stream=ESTIMATION, softmax=True)
    distinct = len({tuple(r.tolist()) for r in s.softmax_sum.cpu()}) == 4
    results["seeding"] = {"batch_size_independent": same, "distinct_noise": distinct}
    print(f"CHECK seeding: {'ok' if same and distinct else 'FAIL'} {results['seeding']}")


def check_sequential(results: dict) -> None:
    try:
        from bench.sampling import smoothed_certify_sequential
    except ImportError:
        print("CHECK sequential: skipped (not in this version)")
        return
    model = _cnn(1)
    x = torch.rand(30, 1, 8, 8, device=DEVICE)
    y = model(x).argmax(1)
    outs = [
        smoothed_certify_sequential(
            model,
            x,
            sigma=0.25,
            radii=[0.0, 0.1, 0.25, 0.5],
            alpha=0.001,
            max_n=20000,
            labels=y,
            seed=3,
            batch_size=b,
        )
        for b in (None, 777)
    ]
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(outs[0], outs[1], strict=True))
    mean_draws = float(outs[0][2].double().mean())
    results["sequential"] = {"batch_size_independent": same, "mean_draws": mean_draws}
    print(f"CHECK sequential: {'ok' if same else 'FAIL'} {results['sequential']}")


def check_quick_board(results: dict, out: Path) -> None:
    store = out / "quick-cuda.sqlite"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "configs/quick.toml", "--device", DEVICE,
         "--store", str(store), "--quiet", "--jobs", "1"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0 and "--jobs" in proc.stderr:  # a version without --jobs
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cli", "run", "configs/quick.toml", "--device", DEVICE,
             "--store", str(store), "--quiet"],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    ok = proc.returncode == 0
    results["quick_board_cuda"] = {"rc": proc.returncode, "seconds": seconds}
    print(proc.stdout[-4000:])
    if not ok:
        print(proc.stderr[-4000:])
    print(f"CHECK quick board on cuda: {'ok' if ok else 'FAIL'} ({seconds:.1f} s)")
    if ok:
        from bench.store import Store

        cpu = {}
        for path in sorted((ROOT / "leaderboards").glob("digits-*.csv")):
            import csv

            for row in csv.DictReader(path.open()):
                cpu[(path.stem.split("-")[1], row["defense"], "accuracy")] = float(row["accuracy"])
        gaps = []
        for cell in Store(store).cells():
            ref = cpu.get((cell["norm"], cell["defense"], "accuracy"))
            if ref is not None:
                gaps.append(abs(cell["metrics"]["accuracy"] - ref))
        results["quick_board_cuda"]["max_accuracy_gap_vs_cpu_board"] = max(gaps, default=None)
        print(f"CHECK cuda vs cpu clean accuracy: max gap {max(gaps, default=float('nan')):.4f}")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check_throughput(results: dict) -> None:
    from bench.sampling import smoothed_certify

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 16 * 16, 10),
    ).to(DEVICE).eval()  # fmt: skip
    x = torch.rand(20, 3, 32, 32, device=DEVICE)
    smoothed_certify(model, x[:2], sigma=0.25, n0=100, n=10000, alpha=0.001, seed=0)
    n = 100_000 if DEVICE == "cuda" else 2_000
    _sync()
    t0 = time.perf_counter()
    smoothed_certify(model, x, sigma=0.25, n0=100, n=n, alpha=0.001, seed=0)
    _sync()
    seconds = time.perf_counter() - t0
    draws = 20 * (n + 100)
    results["throughput"] = {"draws_per_s": draws / seconds, "seconds_per_image": seconds / 20}
    print(f"CHECK throughput: {draws / seconds:,.0f} draws/s, {seconds / 20:.3f} s per 3x32x32 "
          f"image at n = {n}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-smoke")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__}
    for check in (check_seeding, check_sequential, check_throughput):
        try:
            check(results)
        except Exception as exc:  # report every check, then fail
            results[check.__name__] = f"error: {type(exc).__name__}: {exc}"
            print(f"CHECK {check.__name__}: FAIL {type(exc).__name__}: {exc}")
    check_quick_board(results, out)
    (out / "gpu_smoke.json").write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results.items() if isinstance(v, str) and v.startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
