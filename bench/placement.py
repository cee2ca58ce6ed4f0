"""Benchmark: the colocated and the split placement, side by side, on the tiny tasks (issue: timing evidence).

    python bench/placement.py           # ~10 min on 2 CPU cores; writes bench/placement.md

Every run is the real script for the same number of iterations, one after another on the same machine, from one
base per task (`python tools/make_tiny.py --task T --seed S --out OUT/base_T_S`, built once; the runs get its
model.actor, model.critic and data.train_path, and seed=S, default 42). W = tools/with_cpu_memory.py, asyppo.py with
memory/peak_gb measured on CPU too (the process's peak RSS, VmHWM):
  python W                                    colocated, 1 process (2 threads)
  torchrun --nproc_per_node 1 W               colocated, 1 process (1 thread, as every torchrun worker)
  torchrun --nproc_per_node 2 W               colocated, 2 processes: actor and both critics on each
  torchrun --nproc_per_node 2 W placement=split   rank 0: rollout + actor; rank 1: both critics
  python W algo.name=grpo                     GRPO, no critics: the cost the paper compares AsyPPO with
  torchrun --nproc_per_node 1 W algo.name=grpo    the same, 1 thread: split 1 + 1's actor rank, no critics
For each: the median over iterations of every logged phase (time/*_s) and of actor + critic update (their sum), the
first and last 50-iteration rewards, and the peak resident memory of one process. The trainer no longer logs
time/update_overlap_s (how long the two updates ran at the same time in split), so the table has no overlap column
and nothing stands in for it (tables written before, e.g. bench/placement.md, still have one).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SETUPS = {
    "python, colocated": ([sys.executable], []),  # launcher, extra overrides
    "torchrun 1, colocated": (TORCHRUN + ["--nproc_per_node", "1"], []),
    "torchrun 2, colocated": (TORCHRUN + ["--nproc_per_node", "2"], []),
    "torchrun 2, split 1 + 1": (TORCHRUN + ["--nproc_per_node", "2"], ["placement=split"]),
    "python, GRPO (no critics)": ([sys.executable], ["algo.name=grpo"]),
    "torchrun 1, GRPO (no critics)": (TORCHRUN + ["--nproc_per_node", "1"], ["algo.name=grpo"]),
}
PHASES = ["rollout", "values", "actor_update", "critic_update", "sync", "iteration"]


def build_base(task, seed, base):
    """tools/make_tiny.py --task T --seed S into `base` (train.jsonl, actor/, critic/), once: an existing one is
    reused. Written to a temporary directory first, so that a killed build leaves nothing that looks finished."""
    if not (base / "critic" / "config.json").exists():
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "tools/make_tiny.py", "--task", task, "--seed", str(seed), "--out", str(tmp)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
        tmp.rename(base)
    return [f"model.actor={base / 'actor'}", f"model.critic={base / 'critic'}", f"data.train_path={base}/train.jsonl"]


def run_one(setup, preset, steps, out, seed, base):
    metrics = out / "metrics.jsonl"
    if not metrics.exists() or len(metrics.read_text().splitlines()) < steps:  # finished runs are reused
        launcher, overrides = SETUPS[setup]
        cmd = launcher + ["tools/with_cpu_memory.py", "--config", "configs.yaml", "--preset", preset, *base]
        cmd += [f"seed={seed}", f"max_steps={steps}", f"output_dir={out}", *overrides]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def row(setup, m):
    med = {p: statistics.median(x.get(f"time/{p}_s", 0.0) for x in m) * 1000 for p in PHASES}  # milliseconds
    both = statistics.median(
        (x["time/actor_update_s"] + x.get("time/critic_update_s", 0.0)) * 1000 for x in m
    )  # GRPO: no critics
    reward = [x["reward/mean"] for x in m]
    return (
        f"| {setup} | " + " | ".join(f"{med[p]:.1f}" for p in PHASES[:5]) + f" | {both:.1f} | "
        f"**{med['iteration']:.1f}** | {statistics.mean(reward[:50]):.2f} → {statistics.mean(reward[-50:]):.2f} | "
        f"{max(x['memory/peak_gb'] for x in m):.2f} |"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--presets", default="tiny,tiny-add2")
    p.add_argument("--seed", type=int, default=42, help="of every run and of its base (make_tiny.py --seed)")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS), help="default: all")
    p.add_argument("--out", default=str(ROOT / "bench" / "runs" / "placement"))
    args = p.parse_args()
    lines = [
        "# Placement benchmark: colocated vs split",
        "",
        f"`python bench/placement.py --steps {args.steps}`: {args.steps} iterations per run, one run after another, "
        "2 CPU cores, no GPU. Times are medians over iterations, in milliseconds; *updates* = actor update + critic "
        "update (their sum). Peak RSS: VmHWM, measured by tools/with_cpu_memory.py.",
        "",
    ]
    for preset in args.presets.split(","):
        lines += [
            f"## `--preset {preset}`",
            "",
            "| setup | rollout | values + π_old | actor update | critic update | weight sync | updates (sum) "
            "| iteration | reward (first → last 50) | peak RSS / process (GB) |",
            "|" + "---|" * 10,
        ]
        task = "add2" if preset.endswith("add2") else "add"
        base = build_base(task, args.seed, Path(args.out) / f"base_{task}_{args.seed}")
        for setup in args.setups:
            name = "".join(ch for ch in setup if ch.isalnum() or ch in "+_")
            lines.append(
                row(setup, run_one(setup, preset, args.steps, Path(args.out) / preset / name, args.seed, base))
            )
        lines.append("")
    (ROOT / "bench" / "placement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
