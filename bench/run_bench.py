"""Benchmark: AsyPPO against its baselines on the two tiny tasks, several seeds each, one command.

    pip install -r bench/requirements.txt     # matplotlib, on top of the core requirements
    python bench/run_bench.py                  # ~30 min on 2 CPU cores; writes bench/results.md and bench/curves.png

Every run is the real script (`python asyppo.py --config configs.yaml --preset P algo.name=V seed=S ...`), one at a
time, so that the seconds per iteration of the variants are measured side by side on the same machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["asyppo", "ppo", "ppo_small", "grpo"]
TASKS = {"tiny": "add (3+5=)", "tiny-add2": "add2 (47+38=, digit by digit)"}
WINDOW = 25  # iterations in the moving average of the reward


def moving_average(xs, w=WINDOW):
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def run_one(preset, variant, seed, steps, out):
    metrics = out / "metrics.jsonl"
    if not metrics.exists() or len(metrics.read_text().splitlines()) < steps:  # finished runs are reused
        cmd = [sys.executable, "asyppo.py", "--config", "configs.yaml", "--preset", preset, f"algo.name={variant}",
               f"seed={seed}", f"max_steps={steps}", f"output_dir={out}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def summarise(runs, steps):
    """runs: {seed: metrics list} -> the table's numbers for one task x variant."""
    finals, reach, sps, rss = [], [], [], []
    for m in runs.values():
        avg = moving_average([x["reward/mean"] for x in m])
        finals.append(avg[-1])
        reach.append(next((i for i, a in enumerate(avg) if i >= WINDOW - 1 and a >= 0.8), None))
        sps.append(statistics.median(x["time/iteration_s"] for x in m))
        rss.append(max(x["memory/peak_gb"] for x in m))
    reached = [r for r in reach if r is not None]
    return {"final": statistics.mean(finals), "final_std": statistics.pstdev(finals),
            "reach": f"{statistics.mean(reached):.0f} ({len(reached)}/{len(reach)})" if reached else f"never in {steps} (0/{len(reach)})",
            "s_per_it": statistics.mean(sps), "rss": max(rss),
            "start": statistics.mean(moving_average([x["reward/mean"] for x in m])[WINDOW - 1] for m in runs.values())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", default=str(ROOT / "bench" / "runs"))
    args = p.parse_args()
    variants, tasks = args.variants.split(","), args.tasks.split(",")
    t0 = time.time()
    results = {t: {v: {s: run_one(t, v, s, args.steps, Path(args.out) / t / v / f"seed{s}") for s in range(args.seeds)}
                   for v in variants} for t in tasks}

    lines = [f"# Benchmark: AsyPPO vs baselines on the tiny tasks\n",
             f"{args.seeds} seeds x {args.steps} iterations per cell; reward = moving average over {WINDOW} iterations; "
             f"2 CPU cores, single process, runs one after another. Produced by `python bench/run_bench.py` "
             f"in {(time.time() - t0) / 60:.0f} min.\n"]
    for t in tasks:
        lines += [f"\n## {TASKS.get(t, t)}\n",
                  "| method | reward at it. 24 | final reward (mean ± std) | iterations to 0.8 (runs that got there) | s / iteration | peak RSS (GB) |",
                  "|---|---|---|---|---|---|"]
        rows = {v: summarise(results[t][v], args.steps) for v in variants}
        for v, r in rows.items():
            lines.append(f"| {v} | {r['start']:.3f} | {r['final']:.3f} ± {r['final_std']:.3f} | {r['reach']} | "
                         f"{r['s_per_it']:.3f} | {r['rss']:.2f} |")
        if {"asyppo", "grpo", "ppo"} <= set(rows):
            lines.append(f"\nSpeed: AsyPPO / GRPO = {rows['asyppo']['s_per_it'] / rows['grpo']['s_per_it']:.2f}x, "
                         f"AsyPPO / symmetric PPO = {rows['asyppo']['s_per_it'] / rows['ppo']['s_per_it']:.2f}x seconds per iteration.")
    (ROOT / "bench" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, tasks, variants, ROOT / "bench" / "curves.png")


def plot(results, tasks, variants, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for v in variants:
            curves = [moving_average([x["reward/mean"] for x in m]) for m in results[t][v].values()]
            n = min(map(len, curves))
            mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
            sd = [statistics.pstdev(c[i] for c in curves) for i in range(n)]
            ax.plot(range(n), mean, label=v)
            ax.fill_between(range(n), [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
        ax.set_title(TASKS.get(t, t))
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"reward ({WINDOW}-iteration average)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
