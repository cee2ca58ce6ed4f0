"""Benchmark: AsyPPO against its baselines on the two tiny tasks, 5 seeds per cell, with 95% confidence intervals.

    pip install -r bench/requirements.txt     # matplotlib, on top of the core requirements
    python bench/run_bench.py                  # 4 methods x 2 tasks x 5 seeds; writes bench/results.md, curves.png
    python bench/run_bench.py --jobs 2         # two runs at a time, one thread each: about 2/3 of the wall time

Every run is the real script on its seed's own base: `python tools/make_tiny.py --task T --seed S --out
OUT/base_T_S` once per task and seed (data and base models; T = add for --preset tiny, add2 for tiny-add2), then
`python tools/with_cpu_memory.py --config configs.yaml --preset P model.actor=OUT/base_T_S/actor
model.critic=OUT/base_T_S/critic data.train_path=OUT/base_T_S/train.jsonl algo.name=V seed=S ...` (asyppo.py, with
memory/peak_gb measured on CPU too: the process's peak RSS, VmHWM). With --jobs 1 the runs go one after another, so
seconds per iteration compare side by side; with more jobs they share the machine and the seconds per iteration are
not a speed comparison (bench/placement.py is).

Per cell: the reward's 25-iteration moving average at the last iteration, and the first iteration at which that
average reaches the task's threshold, as mean ± the half-width of a 95% confidence interval over seeds (Student's t,
n - 1 degrees of freedom). A seed that never reaches the threshold is counted and left out of that mean.
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["asyppo", "ppo", "ppo_small", "grpo"]
TASKS = {"tiny": "add (3+5=)", "tiny-add2": "add2 (47+38=, digit by digit)"}
THRESHOLD = {"tiny": 0.95, "tiny-add2": 0.8}  # "iterations to threshold": the 25-iteration average reaching it
WINDOW = 25  # iterations in the moving average of the reward
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def moving_average(xs, w=WINDOW):
    return [statistics.mean(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def mean_ci(xs):
    """(mean, half-width of the 95% confidence interval) of a few numbers; half-width nan for fewer than 2.
    >>> mean_ci([0.9, 1.0, 0.95])  # -> (0.95, 0.124): 4.303 * 0.05 / sqrt(3)"""
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan
    return statistics.mean(xs), T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


REUSED = []  # runs found finished in --out by an earlier invocation


def task_of(preset):
    """The make_tiny.py --task of a tiny preset: add2 for tiny-add2, add for tiny and tiny-split."""
    return "add2" if preset.endswith("add2") else "add"


def build_base(task, seed, base, threads):
    """tools/make_tiny.py --task T --seed S into `base` (train.jsonl, actor/, critic/), once: an existing one is
    reused. Written to a temporary directory first, so that a killed build leaves nothing that looks finished."""
    if (base / "critic" / "config.json").exists():
        return base
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "tools/make_tiny.py", "--task", task, "--seed", str(seed), "--out", str(tmp)]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    tmp.rename(base)
    return base


def base_overrides(base):
    """The overrides that point a tiny preset at a make_tiny.py directory."""
    return [f"model.actor={base / 'actor'}", f"model.critic={base / 'critic'}", f"data.train_path={base}/train.jsonl"]


def run_one(preset, variant, seed, steps, out, threads, base):
    metrics = out / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:  # finished runs are reused
        REUSED.append(out)
    else:  # asyppo.py, with memory/peak_gb on CPU too
        cmd = [sys.executable, "tools/with_cpu_memory.py", "--config", "configs.yaml", "--preset", preset]
        cmd += base_overrides(base) + [f"algo.name={variant}", f"seed={seed}", f"max_steps={steps}"]
        cmd += [f"output_dir={out}"]
        print("+", " ".join(cmd), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def critic_ev(metrics, first=175, last=200):
    """The critics' mean explained variance over iterations [first, last), None without critics (GRPO). An iteration
    whose rewards are all equal has none (nan: nothing to explain) and is left out."""
    evs = [
        v for x in metrics[first:last] for k, v in x.items() if k.endswith("/explained_variance") and math.isfinite(v)
    ]
    return statistics.mean(evs) if evs else None


def summarise(runs, threshold):
    """runs: {seed: metrics list} -> the table's numbers for one task x method."""
    curves = {s: moving_average([x["reward/mean"] for x in m]) for s, m in runs.items()}
    w = min([WINDOW] + [len(c) for c in curves.values()]) - 1  # the first full window's end (earlier: a short run's)
    reach = {
        s: next((i for i, a in enumerate(c) if i >= WINDOW - 1 and a >= threshold), None) for s, c in curves.items()
    }
    return {
        "start": mean_ci([c[w] for c in curves.values()]),
        "final": mean_ci([c[-1] for c in curves.values()]),
        "best": mean_ci([max(c[w:]) for c in curves.values()]),
        "reach": mean_ci([r for r in reach.values() if r is not None]),
        "reached": sum(r is not None for r in reach.values()),
        "s_per_it": statistics.mean(statistics.median(x["time/iteration_s"] for x in m) for m in runs.values()),
        "rss": max(max(x["memory/peak_gb"] for x in m) for m in runs.values()),
        "ev": mean_ci([ev for ev in map(critic_ev, runs.values()) if ev is not None]),
        "per_seed": {s: (c[-1], reach[s]) for s, c in curves.items()},
    }


def fmt(mean_half, digits=3):
    mean, half = mean_half
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--out", default=str(ROOT / "bench" / "runs"))
    args = p.parse_args()
    threads = max(
        1, (os.cpu_count() or 1) // args.jobs
    )  # the cores shared out: two 2-thread runs on 2 cores oversubscribe
    variants, tasks, seeds = args.variants.split(","), args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    cells = [(t, v, s) for t in tasks for v in variants for s in seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # the bases first, each once per task and seed
        keys = {(task_of(t), s) for t in tasks for s in seeds}
        built = {k: pool.submit(build_base, *k, out / f"base_{k[0]}_{k[1]}", threads) for k in sorted(keys)}
        bases = {k: f.result() for k, f in built.items()}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            c: pool.submit(
                run_one, *c, args.steps, out / c[0] / c[1] / f"seed{c[2]}", threads, bases[task_of(c[0]), c[2]]
            )
            for c in cells
        }
    results = {t: {v: {s: futures[(t, v, s)].result() for s in seeds} for v in variants} for t in tasks}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout

    lines = [
        "# Benchmark: AsyPPO vs baselines on the tiny tasks\n",
        f"{len(seeds)} seeds ({args.seeds}) x {args.steps} iterations per cell, at commit {commit.strip()}; reward = "
        f"moving average over {WINDOW} iterations; mean ± half-width of the 95% confidence interval over seeds "
        f"(Student's t). Produced by `python bench/run_bench.py --jobs {args.jobs}` in "
        f"{(time.time() - t0) / 60:.0f} min"
        + (f" ({len(REUSED)} of the {len(cells)} runs reused, finished by an earlier invocation)" if REUSED else "")
        + (" (runs sharing the machine: s / iteration is not a speed comparison)" if args.jobs > 1 else "")
        + ".\n",
    ]
    for t in tasks:
        thr = THRESHOLD.get(t, 0.8)
        lines += [
            f"\n## {TASKS.get(t, t)}\n",
            f"| method | reward at it. {WINDOW - 1} | best | final (it. {args.steps - 1}) | iterations to {thr} "
            "| seeds that reached it | critics' explained variance, it. 175-199 | s / iteration | peak RSS (GB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = {v: summarise(results[t][v], thr) for v in variants}
        for v, r in rows.items():
            lines.append(
                f"| {v} | {fmt(r['start'])} | {fmt(r['best'])} | {fmt(r['final'])} | {fmt(r['reach'], 0)} | "
                f"{r['reached']}/{len(seeds)} | {fmt(r['ev'])} | {r['s_per_it']:.3f} | {r['rss']:.2f} |"
            )
        lines.append("\nPer seed, final reward (iteration the average reached the threshold, – never):\n")
        for v, r in rows.items():
            per = ", ".join(f"{s}: {f:.3f} ({'–' if i is None else i})" for s, (f, i) in r["per_seed"].items())
            lines.append(f"- {v}: {per}")
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
            band = [mean_ci([c[i] for c in curves]) for i in range(n)]
            mean, half = [b[0] for b in band], [0.0 if math.isnan(b[1]) else b[1] for b in band]
            ax.plot(range(n), mean, label=v)
            ax.fill_between(
                range(n), [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2
            )
        ax.set_title(f"{TASKS.get(t, t)}: mean and 95% CI over seeds")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"reward ({WINDOW}-iteration average)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
