"""Benchmark: the colocated and the split placement, side by side, on the tiny tasks (issue: timing evidence).

    python bench/placement.py           # ~10 min on 2 CPU cores; writes bench/placement.md

Every run is the real script for the same number of iterations, one after another on the same machine:
  python asyppo.py                                    colocated, 1 process (2 threads)
  torchrun --nproc_per_node 1 asyppo.py               colocated, 1 process (1 thread, as every torchrun worker)
  torchrun --nproc_per_node 2 asyppo.py               colocated, 2 processes: actor and both critics on each
  torchrun --nproc_per_node 2 asyppo.py placement=split   rank 0: rollout + actor; rank 1: both critics
  python asyppo.py algo.name=grpo                     GRPO, no critics: the cost the paper compares AsyPPO with
  torchrun --nproc_per_node 1 asyppo.py algo.name=grpo    the same, 1 thread: split 1 + 1's actor rank, no critics
For each: the median over iterations of every logged phase (time/*_s), of actor + critic update (their sum) and of
time/update_overlap_s (how long the two updates ran at the same time), the first and last 50-iteration rewards, and
the peak resident memory of one process.
"""

import argparse
import json
import os
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
PHASES = ["rollout", "values", "actor_update", "critic_update", "sync", "update_overlap", "iteration"]


def run_one(setup, preset, steps, out):
    metrics = out / "metrics.jsonl"
    if not metrics.exists() or len(metrics.read_text().splitlines()) < steps:  # finished runs are reused
        launcher, overrides = SETUPS[setup]
        cmd = launcher + [
            "asyppo.py",
            "--config",
            "configs.yaml",
            "--preset",
            preset,
            f"max_steps={steps}",
            f"output_dir={out}",
            *overrides,
        ]
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
        f"| {setup} | "
        + " | ".join(f"{med[p]:.1f}" for p in PHASES[:5])
        + f" | {both:.1f} | {med['update_overlap']:.1f} | "
        f"**{med['iteration']:.1f}** | {statistics.mean(reward[:50]):.2f} → {statistics.mean(reward[-50:]):.2f} | "
        f"{max(x['memory/peak_gb'] for x in m):.2f} |"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--presets", default="tiny,tiny-add2")
    p.add_argument("--out", default=str(ROOT / "bench" / "runs" / "placement"))
    args = p.parse_args()
    lines = [
        "# Placement benchmark: colocated vs split",
        "",
        f"`python bench/placement.py --steps {args.steps}`: {args.steps} iterations per run, one run after another, "
        "2 CPU cores, no GPU. Times are medians over iterations, in milliseconds; *updates* = actor update + critic "
        "update (their sum), *overlap* = how long the two ran at the same time (`time/update_overlap_s`).",
        "",
    ]
    for preset in args.presets.split(","):
        lines += [
            f"## `--preset {preset}`",
            "",
            "| setup | rollout | values + π_old | actor update | critic update | weight sync | updates (sum) "
            "| overlap | iteration | reward (first → last 50) | peak RSS / process (GB) |",
            "|" + "---|" * 11,
        ]
        for setup in SETUPS:
            name = "".join(ch for ch in setup if ch.isalnum() or ch in "+_")
            lines.append(row(setup, run_one(setup, preset, args.steps, Path(args.out) / preset / name)))
        lines.append("")
    (ROOT / "bench" / "placement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
