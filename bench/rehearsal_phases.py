"""Seconds per iteration per phase of the paper-preset rehearsal (README, "Rehearse the paper preset on CPU").

    python tools/build_rehearsal_model.py /tmp/rehearsal                  # once: rehearsal/actor, rehearsal/critic
    python bench/rehearsal_phases.py /tmp/rehearsal --engine hf [--checkout DIR] [--steps 4] [--max-new-tokens 128]
    python bench/rehearsal_phases.py --table RUN.json [RUN.json ...]      # runs side by side

Runs `tools/with_cpu_memory.py` (asyppo.py with its memory/*_gb measured on CPU too) of --checkout (default: this
one; an older commit's worktree measures "before": a checkout older than that tool runs its `asyppo.py`, which logged
them on CPU itself) under torchrun, split 1 actor rank + 1 critic rank (or --placement colocated: 1 process), the
qwen3-4b-base preset with only paths, sizes and device overridden as in test_rehearsal_paper_preset_*, but with a few
more responses per prompt (--group-size), longer ones (--max-new-tokens) and questions of different lengths, so that
the batch has prompt and response padding. No evaluation (eval.steps=0). Prints the per-phase seconds (metrics.jsonl
time/*) averaged over the iterations after the first (warm-up), the per-phase peak memory (memory/*_gb: VmHWM on CPU,
the max over ranks), the load average before and after, and writes OUT/run.json for --table. --dry-run also prints
the memory plan of the same overrides (tools/plan_memory.py of the checkout; `asyppo.py --dry-run` at a checkout older
than that tool).
Extra key=value arguments are passed on (e.g. rollout.sync_check_tol=1 for an older commit).
--cpu-clock: the trainer's time.time() reads its process's CPU time (time.process_time, through a sitecustomize.py
in the worker processes only), so time/* are CPU seconds per rank and phase: on a shared machine they move far less
with the other jobs' load than wall seconds do (with one thread per rank, CPU seconds are the work done; waits in
collectives cost none). Tried with the hf engine only (vLLM reads time.time itself).
Use the venv of the engine: the core venv for hf, the vLLM venv for vllm."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [
    ("What is 2+3?", "5"),
    (
        "A farmer has 12 sheep and buys 7 more, then sells 4 of them at the market on Sunday. "
        "How many sheep does the farmer have now?",
        "15",
    ),
    ("What is 10-7?", "3"),
    (
        "Tom reads 15 pages of his book every day for a week, and 20 pages on each of the next 3 days. "
        "How many pages has he read in total?",
        "165",
    ),
    ("What is 3*3?", "9"),
    ("A rectangle is 8 cm long and 5 cm wide. What is its area in square centimetres?", "40"),
    ("What is 12/4?", "3"),
    ("Anna has twice as many apples as Ben, and Ben has 6 apples. How many apples do they have together?", "18"),
]
PHASES = ["rollout_s", "values_s", "actor_update_s", "critic_update_s", "sync_s", "iteration_s"]
MEMORY = ["rollout_gb", "values_gb", "update_gb", "sync_gb", "peak_gb"]


def overrides(models, engine, out, steps, max_new_tokens, group_size, placement="split"):
    data = out / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "final_answer": a, "difficulty": 1 + i % 3}) + "\n"
            for i, (q, a) in enumerate(QUESTIONS)
        )
    )
    n = 2 * group_size  # 2 prompts per iteration: one actor optimizer step, each critic on half the batch
    return [
        "--config",
        "configs.yaml",
        "--preset",
        "qwen3-4b-base",
        "device=cpu",
        f"placement={placement}",
        "actor_ranks=1",
        f"max_steps={steps}",
        "rollout.prompts_per_step=2",
        f"rollout.group_size={group_size}",
        f"rollout.max_new_tokens={max_new_tokens}",
        "data.max_prompt_tokens=96",
        f"actor.sequences_per_step={n}",
        f"critic.sequences_per_step={n // 2}",
        "eval.steps=0",
        "eval.sets=[]",
        "save_steps=0",
        f"model.actor={models}/actor",
        f"model.critic={models}/critic",
        f"rollout.engine={engine}",
        f"output_dir={out / 'out'}",
        f"data.train_path={data}",
    ]


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def commit(checkout):
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
    ).stdout.strip()


def measure(args):
    out = Path(args.out or f"/tmp/rehearsal_phases/{args.engine}-{commit(args.checkout)}-{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    argv = overrides(args.models, args.engine, out, args.steps, args.max_new_tokens, args.group_size, args.placement)
    argv += args.extra
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    run = {
        "engine": args.engine,
        "commit": commit(args.checkout),
        "checkout": str(args.checkout),
        "argv": argv,
        "clock": "cpu" if args.cpu_clock else "wall",
        "placement": args.placement,
    }
    if args.cpu_clock:  # torchrun's workers have LOCAL_RANK; the launcher keeps its wall clock
        (out / "sitecustomize.py").write_text(
            'import os, time\nif "LOCAL_RANK" in os.environ:\n    time.time = time.process_time\n'
        )
        env["PYTHONPATH"] = os.pathsep.join([str(out), *filter(None, [env.get("PYTHONPATH")])])
    if args.dry_run:
        # an older checkout (a "before" measurement) has no tool yet: its asyppo.py printed the plan itself
        tool = Path(args.checkout) / "tools" / "plan_memory.py"
        planner = ["tools/plan_memory.py"] if tool.is_file() else ["asyppo.py", "--dry-run"]
        p = subprocess.run(
            [sys.executable, *planner, *argv, "--world-size", "2"],
            cwd=args.checkout,
            env=env,
            capture_output=True,
            text=True,
        )
        run["dry_run"] = p.stdout + p.stderr
        print(run["dry_run"])
    # asyppo.py logs memory/*_gb on GPUs only; the wrapper adds them on CPU. An older checkout has no wrapper: its
    # asyppo.py measured them itself
    wrapper = Path(args.checkout) / "tools" / "with_cpu_memory.py"
    run["script"] = script = "tools/with_cpu_memory.py" if wrapper.is_file() else "asyppo.py"
    run["load_before"], t0 = loadavg(), time.time()
    with open(out / "log.txt", "w") as log:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2" if args.placement == "split" else "1",
                script,
                *argv,
            ],
            cwd=args.checkout,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    run["load_after"], run["wall_s"] = loadavg(), time.time() - t0
    if p.returncode:
        sys.exit(f"run failed ({p.returncode}): see {out / 'log.txt'}")
    metrics = [json.loads(line) for line in (out / "out" / "metrics.jsonl").read_text().splitlines()]
    measured = metrics[1:] or metrics
    run["iterations"] = [{k: m.get(k) for k in m if k.startswith(("time/", "memory/", "response/"))} for m in metrics]
    run["mean"] = {k: sum(m.get(f"time/{k}", 0.0) for m in measured) / len(measured) for k in PHASES}
    run["memory"] = {k: max(m.get(f"memory/{k}", 0.0) for m in metrics) for k in MEMORY}
    ranks = sorted({k for m in metrics for k in m if k.startswith("memory/peak_gb_rank")})  # with_cpu_memory.py's
    run["memory_per_rank"] = [max(m.get(k, 0.0) for m in metrics) for k in ranks]
    run["response_length"] = sum(m["response/length_mean"] for m in measured) / len(measured)
    (out / "run.json").write_text(json.dumps(run, indent=1))
    table([run])
    print(f"written {out / 'run.json'}")


def table(runs):
    print("| engine | commit | clock | " + " | ".join(PHASES) + " | response tokens (mean) | load avg before / after |")
    print("|---" * (len(PHASES) + 5) + "|")
    for r in runs:
        print(
            f"| {r['engine']} | {r['commit']} | {r.get('clock', 'wall')} | "
            + " | ".join(f"{r['mean'][k]:.2f}" for k in PHASES)
            + f" | {r['response_length']:.1f} | {r['load_before']} / {r['load_after']} |"
        )
    print("\nper-phase peak memory, GB (max over ranks and iterations):")
    print("| engine | commit | " + " | ".join(MEMORY) + " |")
    print("|---" * (len(MEMORY) + 2) + "|")
    for r in runs:
        print(f"| {r['engine']} | {r['commit']} | " + " | ".join(f"{r['memory'][k]:.2f}" for k in MEMORY) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="?", help="the directory tools/build_rehearsal_model.py wrote")
    parser.add_argument("extra", nargs="*", help="more key=value overrides")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--steps", type=int, default=4, help="iterations; the first is not averaged")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--placement", default="split", choices=["split", "colocated"], help="colocated: 1 process")
    parser.add_argument("--out")
    parser.add_argument("--cpu-clock", action="store_true", help="time/* in CPU seconds (hf engine)")
    parser.add_argument("--dry-run", action="store_true", help="print the memory plan of these overrides too")
    parser.add_argument("--table", nargs="+", help="run.json files: print them side by side, run nothing")
    args = parser.parse_args()
    if args.table:
        table([json.loads(Path(f).read_text()) for f in args.table])
    else:
        measure(args)
