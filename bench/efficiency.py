"""The paper's efficiency claim in miniature: AsyPPO against symmetric PPO and GRPO on the paper preset's rehearsal.

    python tools/build_rehearsal_model.py /tmp/rehearsal                 # once: rehearsal/actor, rehearsal/critic
    python bench/efficiency.py /tmp/rehearsal [--rounds 3] [--steps 3] [--max-new-tokens 64]
    python bench/efficiency.py --table /tmp/efficiency/results.json     # the tables again, run nothing

Each run is bench/rehearsal_phases.py (the qwen3-4b-base preset over SmolLM2-135M-Instruct, hf engine, its
per-phase seconds after the first iteration and tools/with_cpu_memory.py's peak memory per rank) with one of:
  asyppo  2 mini-critics (rehearsal/critic: the actor's first 2 layers + a value head)
  ppo     1 critic from the actor's own checkpoint (30 layers, the symmetric baseline)
  grpo    no critic (colocated only: split places critics, and GRPO has none)
in two placements: colocated on 1 process, and split 1 actor rank + 1 critic rank (torchrun, 2 processes). The rounds
interleave the configurations (round 1 runs each once, then round 2, ...), so that a slow spell of a shared machine
hits every configuration alike. Writes OUT/results.json and prints per configuration the range over the rounds.
Results: bench/efficiency.md."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIGS = [("asyppo", "colocated"), ("ppo", "colocated"), ("grpo", "colocated"), ("asyppo", "split"), ("ppo", "split")]
PHASES = ["rollout_s", "values_s", "actor_update_s", "critic_update_s", "sync_s", "iteration_s"]


def run_one(args, method, placement, round_):
    out = Path(args.out) / f"{method}-{placement}-{round_}"
    cmd = [sys.executable, str(Path(__file__).parent / "rehearsal_phases.py"), args.models, f"algo.name={method}"]
    cmd += ["--placement", placement, "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{method} {placement} round {round_} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"method": method, "placement": placement, "round": round_, "mean": run["mean"],
            "memory_per_rank": run["memory_per_rank"], "response_length": run["response_length"],
            "load": [run["load_before"], run["load_after"]]}  # fmt: skip


def span(xs, fmt="{:.1f}"):
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def tables(results):
    print("seconds per iteration and phase (mean over the iterations after the first; range over the rounds):")
    print("| method | placement | " + " | ".join(PHASES) + " | response tokens |")
    print("|---" * (len(PHASES) + 3) + "|")
    for method, placement in CONFIGS:
        rs = [r for r in results if (r["method"], r["placement"]) == (method, placement)]
        if rs:
            cells = [span([r["mean"][k] for r in rs]) for k in PHASES]
            print(
                f"| {method} | {placement} | " + " | ".join(cells) + f" | {span([r['response_length'] for r in rs])} |"
            )
    print("\npeak memory per rank, GB (VmHWM; range over the rounds):")
    print("| method | placement | rank 0 | rank 1 | sum |")
    print("|---|---|---|---|---|")
    for method, placement in CONFIGS:
        rs = [r for r in results if (r["method"], r["placement"]) == (method, placement)]
        if rs:
            ranks = len(rs[0]["memory_per_rank"])
            cells = [span([r["memory_per_rank"][i] for r in rs], "{:.2f}") for i in range(ranks)] + ["-"] * (2 - ranks)
            total = span([sum(r["memory_per_rank"]) for r in rs], "{:.2f}")
            print(f"| {method} | {placement} | " + " | ".join(cells) + f" | {total} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="?", help="the directory tools/build_rehearsal_model.py wrote")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="iterations per run; the first is not averaged")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default="/tmp/efficiency")
    parser.add_argument("--table", help="a results.json: print its tables, run nothing")
    args = parser.parse_args()
    if args.table:
        tables(json.loads(Path(args.table).read_text()))
        sys.exit()
    results = []
    for round_ in range(1, args.rounds + 1):
        for method, placement in CONFIGS:
            results.append(run_one(args, method, placement, round_))
            r = results[-1]
            print(f"round {round_} {method} {placement}: {r['mean']['iteration_s']:.1f} s/iteration, "
                  f"peak GB per rank {[round(x, 2) for x in r['memory_per_rank']]}", flush=True)  # fmt: skip
            Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
    tables(results)
