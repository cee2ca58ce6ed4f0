"""The one-GPU check: run what one CUDA GPU can run of asyppo.py, then print one summary. Offline; needs only torch,
transformers and math-verify (with its two dependencies, carried as wheels: the GPU machine has no internet).
Each part fits a short slot: about 1-3 minutes on one H100 by estimate, and --timeout (240 s) per trainer run, after
which the part's summary still prints what its run logged.

    # on a machine WITH internet, once (0.4 MB):
    pip download --no-deps -d wheels math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
    # on the GPU machine (torch + transformers installed; sympy comes with torch), from the repository root:
    pip install --no-index --no-deps wheels/*.whl
    python tools/gpu_check.py --parts 1       # the tiny preset on the GPU in bf16
    python tools/gpu_check.py --parts 2       # Qwen3-0.6B shapes at 2,048 new tokens (--max-new-tokens 8000: longer)
    python tools/gpu_check.py --cpu-smoke     # both parts on CPU at toy sizes (CI checks the script with this)

Part 1: the tiny preset with device=cuda and model.param_dtype=bfloat16 (--tiny-steps iterations): reward, the
  weight-sync check's diff, seconds per iteration and peak memory, from its metrics.jsonl.
Part 2: a model with Qwen3-0.6B's published shapes (config.json of https://huggingface.co/Qwen/Qwen3-0.6B), random
  weights, written with save_pretrained next to a tokenizer built in code (a WordLevel vocabulary "t0".."tN" covering
  all 151,936 ids; nothing is downloaded), used as the actor AND as the critics' checkpoint. Trained with the hf engine,
  bf16, gradient checkpointing, 2 prompts x 2 responses from a jsonl this script writes, for --steps iterations at
  --max-new-tokens. Random weights almost never emit EOS, so responses run to the limit: the point is to measure
  memory at long responses. Prints the measured peak memory per phase (memory/{rollout,values,update,sync}_gb)
  next to the memory plan of tools/plan_memory.py for the same shapes and overrides.
Exits non-zero if a part fails, after printing that part's last lines; every part's full log is in OUT/<part>.log.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, (unused), EOS: ids 0, 1, 2
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1000000,
    rms_norm_eps=1e-6,
)  # Qwen/Qwen3-0.6B's config.json
TOY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=256,
)  # --cpu-smoke
PHASES = ("rollout", "values", "update", "sync")


def word_tokenizer(vocab_size):
    """A tokenizer covering every id of the model: the 3 specials, then "t0" .. "t{vocab_size - 4}", split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"t{i}" for i in range(vocab_size - len(SPECIALS))])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )


def build_model(out_dir, shapes, seed=0):
    """Random weights with the given shapes, saved in bfloat16 (as Qwen3 is published) with the tokenizer."""
    tokenizer = word_tokenizer(shapes["vocab_size"])
    torch.manual_seed(seed)
    config = Qwen3Config(**shapes, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def write_prompts(path, n=8):
    """n prompts of 16 tokens in the jsonl field names of DeepMath-103K (question / final_answer)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"question": " ".join(f"t{(7 * i + j) % 97}" for j in range(16)), "final_answer": str(i)})
                + "\n"
            )


def start(name, args, out_dir, script="tools/with_cpu_memory.py"):
    """Start `script` (the trainer, through the wrapper that adds memory metrics on CPU, or a tool) with the tiny
    preset and `args` on top of it, its output going to OUT/<name>.log."""
    cmd = [sys.executable, str(ROOT / script), "--config", "configs.yaml", "--preset", "tiny", *args]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    log = open(out_dir / f"{name}.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env), log, time.time()


def finish(started, timeout):
    """Wait for a started run: (ok, its log text, seconds)."""
    proc, log, t0 = started
    try:
        proc.wait(timeout=timeout)
        status = f"(exit status {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = f"(killed after {timeout} s)"
    log.close()
    text = Path(log.name).read_text(errors="replace")
    return proc.returncode == 0, text + ("" if proc.returncode == 0 else f"\n{status}"), time.time() - t0


def metrics_of(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def peaks(metrics):
    """Per phase, the largest memory/<phase>_gb over the run's iterations (GB)."""
    return {ph: max(m.get(f"memory/{ph}_gb", float("nan")) for m in metrics) for ph in PHASES}


def describe_run(metrics):
    """One line from metrics.jsonl. s/iteration: the median, leaving out iteration 0 when there are more (warm-up)."""
    times = sorted(m["time/iteration_s"] for m in (metrics[1:] if len(metrics) > 1 else metrics))
    peak = peaks(metrics)
    return (
        f"{len(metrics)} iterations  reward first {metrics[0]['reward/mean']:.3f} "
        f"last {metrics[-1]['reward/mean']:.3f}  "
        f"sync_check_diff max {max(m['rollout/sync_check_diff'] for m in metrics):.3g}  "
        f"s/iteration {times[len(times) // 2]:.2f}  response length {metrics[-1]['response/length_mean']:.0f}  "
        f"peak memory GB " + " ".join(f"{ph} {gb:.2f}" for ph, gb in peak.items())
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="working directory (models, data, runs, logs)")
    parser.add_argument("--cpu-smoke", action="store_true", help="both parts on CPU at toy sizes: checks this script")
    parser.add_argument("--tiny-steps", type=int, default=20, help="part 1: iterations of the tiny preset")
    parser.add_argument("--steps", type=int, default=2, help="part 2: iterations")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="part 2: response length cap")
    parser.add_argument(
        "--critic-layers", type=int, default=0, help="part 2: >0: critics of this many layers (same vocab)"
    )
    parser.add_argument("--timeout", type=int, default=240, help="seconds per trainer run (then its summary)")
    parser.add_argument("--parts", default="1,2", help="which parts to run, e.g. 2")
    args = parser.parse_args()
    device, dtype = ("cpu", "bfloat16") if args.cpu_smoke else ("cuda", "bfloat16")
    if args.cpu_smoke:  # toy sizes: seconds on 2 CPU cores
        args.tiny_steps, args.steps, args.max_new_tokens = (
            min(args.tiny_steps, 2),
            min(args.steps, 2),
            min(args.max_new_tokens, 24),
        )
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible (use --cpu-smoke to check the script on CPU)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (cpu smoke)"
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 80.0
    print(f"gpu_check: device {device} ({gpu}), torch {torch.__version__}, output in {out}", flush=True)
    parts = [int(p) for p in args.parts.split(",")]
    results = []  # (part name, ok, summary lines)

    # ---- part 1: the tiny preset on the GPU, bf16 ----------------------------------------------------------------
    if 1 in parts:
        name, run_dir, base = "part1_tiny", out / "tiny", out / "tiny_base"
        warm = ["--warm-start-steps", "5"] if args.cpu_smoke else []
        cmd = [sys.executable, "tools/make_tiny.py", "--out", str(base), "--prompts", "5000", *warm]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        overrides = [
            f"model.actor={base / 'actor'}",
            f"model.critic={base / 'critic'}",
            f"data.train_path={base / 'train.jsonl'}",
            f"device={device}",
            f"model.param_dtype={dtype}",
            f"max_steps={args.tiny_steps}",
            f"output_dir={run_dir}",
        ]
        ok, text, secs = finish(start(name, overrides, out), args.timeout)
        metrics = metrics_of(run_dir)
        ok = ok and len(metrics) == args.tiny_steps
        lines = [describe_run(metrics)] if metrics else []  # after a timeout too: what the run logged
        results.append((f"part 1 tiny preset ({device}, {dtype}, {secs:.0f} s)", ok, lines, text))

    # ---- part 2: Qwen3-0.6B shapes, random weights, long responses, gradient checkpointing -----------------------
    if 2 in parts:
        name, run_dir = "part2_qwen3_0.6b", out / "qwen3_0.6b"
        shapes = TOY if args.cpu_smoke else QWEN3_0_6B
        model_dir, critic_dir, data = out / "model_actor", out / "model_critic", out / "prompts.jsonl"
        t0 = time.time()
        n = build_model(model_dir, shapes)
        critic = model_dir
        if args.critic_layers:
            build_model(critic_dir, {**shapes, "num_hidden_layers": args.critic_layers}, seed=1)
            critic = critic_dir
        write_prompts(data)
        print(
            f"built a random {n / 1e6:.1f} M-parameter Qwen3 ({shapes['num_hidden_layers']} layers, vocabulary "
            f"{shapes['vocab_size']:,}) in {model_dir} in {time.time() - t0:.0f} s",
            flush=True,
        )
        overrides = [
            f"device={device}",
            f"model.param_dtype={dtype}",
            "model.grad_checkpointing=true",
            f"model.actor={model_dir}",
            f"model.critic={critic}",
            f"data.train_path={data}",
            "rollout.engine=hf",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "actor.sequences_per_step=4",
            "actor.micro_batch_size=1",
            "actor.forward_micro_batch_size=1",
            "critic.sequences_per_step=2",
            "critic.micro_batch_size=1",
            "critic.forward_micro_batch_size=1",
            f"max_steps={args.steps}",
            f"output_dir={run_dir}",
        ]
        # the plan loads only config.json files: it runs alongside the training
        plan_args = [*overrides, "--world-size", "1", "--gpu-memory-gb", f"{gpu_gb:.1f}"]
        dry_run = start(name + "_dry_run", plan_args, out, script="tools/plan_memory.py")
        training = start(name, overrides, out)
        ok_plan, plan, _ = finish(dry_run, args.timeout)
        plan_lines = [line for line in plan.splitlines() if line.strip()] if ok_plan else []
        ok, text, secs = finish(training, args.timeout)
        metrics = metrics_of(run_dir)
        ok = ok and ok_plan and len(metrics) == args.steps
        lines = []
        if metrics and ok_plan:  # after a timeout too: what the run logged
            measured = peaks(metrics)
            lines = [
                describe_run(metrics),
                "measured peak GB per phase (memory/<phase>_gb, max over iterations): "
                + "  ".join(f"{ph} {gb:.2f}" for ph, gb in measured.items()),
                "plan (tools/plan_memory.py, same overrides, 1 rank):",
                *[f"  | {line}" for line in plan_lines],
            ]
        results.append(
            (
                f"part 2 Qwen3-0.6B shapes ({'toy shapes' if args.cpu_smoke else f'{n / 1e9:.3f} B params'}, {device}, "
                f"{dtype}, hf engine, grad checkpointing, {args.max_new_tokens} new tokens, {secs:.0f} s)",
                ok,
                lines,
                text if ok_plan else plan,
            )
        )

    # ---- summary ---------------------------------------------------------------------------------------------------
    print("\n" + "=" * 100 + f"\ngpu_check summary: device {device} ({gpu})")
    for title, ok, lines, text in results:
        print(f"{title}: {'OK' if ok else 'FAILED'}")
        for line in lines:
            print(f"  {line}")
        if not ok:
            print("  last lines of its log:")
            for line in text.strip().splitlines()[-25:]:
                print(f"    {line}")
    failed = [title for title, ok, _, _ in results if not ok]
    print(f"gpu_check: {'FAILED: ' + '; '.join(failed) if failed else 'all parts passed'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
