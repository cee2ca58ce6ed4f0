"""Does the quick start learn? The tiny preset, as the README runs it, on several seeds and CPU float paths.

    python bench/learning.py --seeds 1 2 3 4 5 --cpus native avx2 default --jobs 2    # writes bench/runs/learning/

Each run: `python tools/make_tiny.py --seed S` (data and base models of that seed), then
`python asyppo.py --config configs.yaml --preset tiny seed=S` with ATEN_CPU_CAPABILITY set to the CPU path (native:
unset), one thread per run. Per run it prints the reward's mean over iterations 0-24, the best 25-iteration moving
average and the first iteration whose moving average reaches 0.95, and the mean over the last 50 iterations.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "runs" / "learning"


def one(seed, cpu):
    base, run = OUT / f"base{seed}", OUT / cpu / str(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if cpu != "native":
        env["ATEN_CPU_CAPABILITY"] = cpu
    if not (base / "critic").exists():  # the base is built once per seed, on the native float path
        subprocess.run([sys.executable, "tools/make_tiny.py", "--out", base, "--seed", str(seed)], cwd=ROOT, check=True,
                       capture_output=True, env={**env, "ATEN_CPU_CAPABILITY": ""})  # fmt: skip
    paths = [
        f"model.actor={base / 'actor'}",
        f"model.critic={base / 'critic'}",
        f"data.train_path={base / 'train.jsonl'}",
    ]
    cmd = [sys.executable, "asyppo.py", "--config", "configs.yaml", "--preset", "tiny", f"seed={seed}", *paths]
    subprocess.run([*cmd, f"output_dir={run}"], cwd=ROOT, env=env, check=True, capture_output=True)
    rewards = [json.loads(line)["reward/mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [json.loads(line)["time/iteration_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    avg = [statistics.mean(rewards[i - 24 : i + 1]) for i in range(24, len(rewards))]  # ends at iteration i
    first = next((i + 24 for i, a in enumerate(avg) if a >= 0.95), None)
    return dict(seed=seed, cpu=cpu, start=statistics.mean(rewards[:25]), best=max(avg), at_095=first,
                last50=statistics.mean(rewards[-50:]), s_per_it=statistics.median(seconds))  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--cpus", nargs="+", default=["native", "avx2", "default"])
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # the bases first, so that no two runs build the same one
        base = OUT / f"base{seed}"
        if not (base / "critic").exists():
            subprocess.run([sys.executable, "tools/make_tiny.py", "--out", base, "--seed", str(seed)], cwd=ROOT,
                           check=True, capture_output=True)  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(one, s, c) for c in args.cpus for s in args.seeds]
        for job in jobs:
            r = job.result()
            print(
                f"{r['cpu']:8s} seed {r['seed']}: start {r['start']:.3f}  best 25-it. avg {r['best']:.3f} "
                f"(0.95 at it. {r['at_095']})  last 50 {r['last50']:.3f}  {r['s_per_it']:.2f} s/it",
                flush=True,
            )
            with open(OUT / "summary.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
