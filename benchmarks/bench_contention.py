"""Contention benchmark (issue #20): wall time idle and next to busy-loop processes.

Workloads, each a fresh ``certbench`` process:

* ``quick`` — ``certbench run configs/quick.toml`` (or ``--spec``) into a fresh store (wall
  time of the command);
* ``wk-certify`` — ``certbench certify`` of the released Wong–Kolter Fashion-MNIST model on
  the first ``--wk-limit`` (200) test images at ℓ∞ 0.1 (the certify stage's own ``seconds``;
  wall time of the command beside it).

Variants: ``default`` (this version's policy: ``--jobs`` = usable cores for ``run``, the
free cores for ``certify``), ``all-threads`` (the policy before issue #20: one process, as
many intra-op threads as cores: ``--jobs 1`` and ``CERTBENCH_NUM_THREADS`` = cores) and
``one-thread`` (``--jobs 1``, ``CERTBENCH_NUM_THREADS=1``).

Scenarios: ``idle`` and ``busy1``/``busy2``: 1 or 2 pure-Python busy loops
(``while True: pass``) that the benchmark starts before the command and kills after it.
Each measurement is repeated ``--repeats`` times (median reported), interleaving variants
and scenarios so that slow drifts of the machine spread over all of them.

Run from the repository root on a quiet machine (it takes several minutes on 2 cores)::

    python benchmarks/bench_contention.py                     # everything, 3 repeats
    python benchmarks/bench_contention.py --workloads quick --variants default --repeats 1

It prints a Markdown table (wall time, slowdown against the same variant idle) and writes
the raw timings as JSON (``--json``, default ``.benchmarks/contention.json``). The machine's
load average before each measurement is recorded too: a figure taken next to other jobs is
not an idle figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WK_CANDIDATES = (
    ROOT / "tests" / "data" / "wong_kolter_fashion_mnist.pth",
    ROOT / "reference" / "wong_kolter_fashion_mnist.pth",
    ROOT.parent / "shared" / "reference" / "wong_kolter_fashion_mnist.pth",
)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
BUSY_LOOP = "while True:\n    pass\n"
SCENARIOS = {"idle": 0, "busy1": 1, "busy2": 2}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _env(variant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTBENCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if variant == "all-threads":
        env["CERTBENCH_NUM_THREADS"] = str(_cores())
    elif variant == "one-thread":
        env["CERTBENCH_NUM_THREADS"] = "1"
    return env


def _command(workload: str, variant: str, work: Path, args: argparse.Namespace) -> list[str]:
    cli = [sys.executable, "-m", "bench.cli"]
    if workload == "quick":
        jobs = [] if variant == "default" else ["--jobs", "1"]
        return [*cli, "run", str(args.spec), "--store",
                str(work / "s.sqlite"), "--quiet", *jobs]  # fmt: skip
    return [*cli, "certify", "--defense", "wong-kolter", "--model", "wk-small",
            "--checkpoint", str(args.wk_checkpoint), "--dataset", "fashion-mnist",
            "--data-dir", str(args.data_dir), "--norm", "linf", "--eps", "0.1",
            "--limit", str(args.wk_limit), "--quiet", "--output", str(work / "c.json")]  # fmt: skip


def measure(workload: str, variant: str, busy: int, args: argparse.Namespace) -> dict:
    """One timed command next to ``busy`` busy loops."""
    work = Path(tempfile.mkdtemp(prefix="certbench-contention-"))
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)  # let the loops take their cores
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(
            _command(workload, variant, work, args),
            cwd=ROOT,
            env=_env(variant),
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{workload}/{variant} failed:\n{proc.stderr}")
        stage = None
        if workload == "wk-certify":
            stage = json.loads((work / "c.json").read_text())["seconds"]
        return {"wall": wall, "stage": stage, "load_before": load}
    finally:
        for p in loops:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _table(rows: list[dict]) -> str:
    out = [
        "| workload | variant | scenario | time (s) | slowdown vs idle |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        slow = "" if r["slowdown"] is None else f"{r['slowdown']:.2f}x"
        out.append(
            f"| {r['workload']} | {r['variant']} | {r['scenario']} | {r['seconds']:.1f} | {slow} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="quick,wk-certify")
    p.add_argument("--variants", default="default,all-threads,one-thread")
    p.add_argument("--scenarios", default="idle,busy1,busy2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--spec", type=Path, default=ROOT / "configs" / "quick.toml")
    p.add_argument("--wk-limit", type=int, default=200)
    p.add_argument("--wk-checkpoint", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", type=Path, default=ROOT / ".benchmarks" / "contention.json")
    args = p.parse_args(argv)
    workloads = args.workloads.split(",")
    if "wk-certify" in workloads:
        found = [c for c in ([args.wk_checkpoint] if args.wk_checkpoint else WK_CANDIDATES)]
        found = [c for c in found if c and c.is_file()]
        if not found or not (args.data_dir / "t10k-images-idx3-ubyte.gz").is_file():
            print("wk-certify skipped: weights or Fashion-MNIST not found", file=sys.stderr)
            workloads.remove("wk-certify")
        else:
            args.wk_checkpoint = found[0]
    variants = args.variants.split(",")
    scenarios = args.scenarios.split(",")
    raw: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for workload in workloads:
            for scenario in scenarios:
                for variant in variants:
                    m = measure(workload, variant, SCENARIOS[scenario], args)
                    raw.setdefault((workload, variant, scenario), []).append(m)
                    shown = m["stage"] if m["stage"] is not None else m["wall"]
                    print(
                        f"[{rep + 1}/{args.repeats}] {workload:10s} {variant:11s} {scenario:5s} "
                        f"{shown:7.2f} s (wall {m['wall']:.2f} s, load before "
                        f"{m['load_before']:.2f})",
                        file=sys.stderr,
                        flush=True,
                    )
    rows = []
    for (workload, variant, scenario), ms in raw.items():
        key = "stage" if workload == "wk-certify" else "wall"
        seconds = statistics.median(m[key] for m in ms)
        rows.append(
            {"workload": workload, "variant": variant, "scenario": scenario, "seconds": seconds}
        )
    for r in rows:
        idle = [q for q in rows if q["scenario"] == "idle" and q["workload"] == r["workload"]
                and q["variant"] == r["variant"]]  # fmt: skip
        r["slowdown"] = r["seconds"] / idle[0]["seconds"] if idle else None
    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (workloads.index(r["workload"]), order[r["variant"]],
                             scenarios.index(r["scenario"])))  # fmt: skip
    print(_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "cores": _cores(),
        "rows": rows,
        "raw": [
            {"workload": w, "variant": v, "scenario": s, "runs": ms}
            for (w, v, s), ms in raw.items()
        ],
    }
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
