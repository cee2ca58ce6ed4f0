"""Plan a run's GPU memory before taking the cluster, from the models' shapes alone.

    python tools/plan_memory.py --config configs.yaml [--preset NAME] --world-size 16 [key=value ...]

Prints, for both placements (colocated and split; the configured one is marked): the layout of the ranks (or why the
world size does not fit it), the batch arithmetic (sequences per iteration and per actor rank, optimizer steps and
micro-batches), and a per-rank memory plan in GB: weights + gradients + AdamW states and the training peak of the
actor and of the critics, the rollout engine, and per phase the total with a verdict against --gpu-memory-gb
(default: the config's rollout.gpu_memory_gb).
Loads only config.json files: the models are built on the meta device, no weights are read or downloaded.
The plan is an upper bound from the shapes; tools/gpu_check.py prints measured peaks next to it.
--world-size defaults to $WORLD_SIZE, else 1. The other arguments are asyppo.py's: --config, --preset, key=value.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `import asyppo` from any working directory
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification  # noqa: E402

import asyppo  # noqa: E402


def memory_plan(cfg, world, gpu_memory_gb=None):
    """For both placements, the layout, the batch arithmetic and a per-rank GPU memory plan (GB) from the models'
    configs alone (built on the meta device: no weights are loaded or downloaded beyond config.json).
    Meant as an upper bound, from the shapes: tools/gpu_check.py prints measured peaks next to it. Besides weights,
    optimizer states and activations it counts the logits' float32 copies and their gradients, FSDP2's unsharded
    float32 gradients before the reduce-scatter, the CUDA context and NCCL's buffers (FIXED_GB) and the caching
    allocator's reserve (RESERVE). gpu_memory_gb: one GPU's memory for the verdict (None: rollout.gpu_memory_gb)."""
    FIXED_GB, RESERVE = 1.5, 1.1  # context + communicators per GPU; blocks cached but not in use (fragmentation)
    ENGINE_GB = 2.0  # vLLM's own peak activations and sampler (its profiling run), an estimate: the GPU check measures
    GB, M, r = 2**30, cfg.algo.num_critics, cfg.rollout
    gpu_gb = r.gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
    bf = 2 if cfg.model.param_dtype == "bfloat16" else 4
    T, L = cfg.data.max_prompt_tokens + r.max_new_tokens, r.max_new_tokens

    def shapes(path, critic):
        config = AutoConfig.from_pretrained(path)
        if critic:
            config.num_labels = 1
        with torch.device("meta"):
            model = (AutoModelForTokenClassification if critic else AutoModelForCausalLM).from_config(config)
        layer = sum(p.numel() for p in getattr(model, model.base_model_prefix).layers[0].parameters())
        root = sum(p.numel() for p in model.parameters()) - layer * config.num_hidden_layers
        return sum(p.numel() for p in model.parameters()), layer, root, config

    def model_gb(path, critic, mb, fwd_mb, shards):
        """-> (parameters, weights + gradients + AdamW GB, training peak GB, no-grad forward peak GB, config)"""
        n, layer, root, c = shapes(path, critic)
        states = 16 * n / shards  # float32 weights + gradients + AdamW's two moments, sharded over the model's ranks
        unsharded = bf * (root + 2 * layer)  # FSDP2 all-gathers the root and one layer (+ the next, prefetched)
        per_layer = mb * T * (c.hidden_size * 12 + c.intermediate_size * 3) * bf  # one layer's saved activations
        acts = (
            (c.num_hidden_layers * mb * T * c.hidden_size * bf + per_layer)
            if cfg.model.grad_checkpointing
            else c.num_hidden_layers * per_layer
        )
        # the LM head's logits in param dtype, then float32: the copy, / temperature, log-softmax, probs and p * log p
        # (entropy), and in backward the gradients of two of them at once: 6 float32 [L, vocabulary] per sequence
        logits = 0 if critic else mb * L * c.vocab_size * (6 * 4 + bf)
        grads = 4 * max(root, 2 * layer)  # FSDP2: unsharded float32 gradients of the root (or 2 layers) to reduce
        # values, π_old passes: hidden states, and the actor's logits with 3 float32 copies of a chunk (no gradients)
        chunk = min(L, asyppo.LOGPROB_CHUNK)
        no_grad = fwd_mb * T * c.hidden_size * bf * 4 + (0 if critic else fwd_mb * c.vocab_size * (L * bf + chunk * 12))
        return n, states / GB, (unsharded + max(acts + logits + grads, no_grad)) / GB, (unsharded + no_grad) / GB, c

    def verdict(gb):
        gb = FIXED_GB + RESERVE * gb
        return f"needs {gb:.1f} of {gpu_gb:.0f} GB: " + ("fits" if gb <= 0.95 * gpu_gb else "does NOT fit")

    def kv_cache_line(c, engine_gb, weights_gb, per_rank):
        """vLLM's KV cache: what is left of its share after its weights and its own activations (ENGINE_GB)."""
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        per_token = c.num_hidden_layers * 2 * kv_heads * head_dim * bf  # keys and values of every layer
        kv = max(0.0, engine_gb - weights_gb - ENGINE_GB)
        tokens = kv * GB / per_token
        return (
            f"    of which weights {weights_gb:.2f}, KV cache ~{kv:.2f} ({per_token / 1024:.0f} KiB per token): "
            f"{tokens / 1e3:.0f}k tokens, {tokens / T:.0f} full-length sequences at once, of {per_rank} per actor rank"
        )

    def suggestion(awake_gb):
        """The gpu_memory_utilization with which the rollout phase (engine + what the trainer holds while it is awake,
        the probe forward included) needs 90% of the GPU, by the verdict's own arithmetic."""
        u = (0.9 * gpu_gb - FIXED_GB - RESERVE * awake_gb) / (RESERVE * gpu_gb)
        return (
            f"  rollout.gpu_memory_utilization={r.gpu_memory_utilization} (configured); {u:.2f} would fill 90% of "
            f"{gpu_gb:.0f} GB in the rollout phase"
        )

    critic_path = cfg.model.actor if cfg.algo.name == "ppo" else cfg.model.critic
    lines = [
        f"dry run: {world} rank(s), method {cfg.algo.name}, sequence length {T} = "
        f"{cfg.data.max_prompt_tokens} prompt + {L} response tokens"
    ]
    for placement in ("colocated", "split"):
        c = dataclasses.replace(cfg, placement=placement)
        head = f"{placement}{' (configured)' if placement == cfg.placement else ''}"
        try:
            layout = asyppo.make_layout(c, world)
            sizes = asyppo.derive_sizes(c, layout)
        except ValueError as e:
            lines.append(f"{head}: does not fit: {e}")
            continue
        held = M if placement == "colocated" else max(1, M // (world - len(layout.actor)))  # critics per critic rank
        na, a_states, a_peak, a_probe, a_config = model_gb(
            cfg.model.actor, False, cfg.actor.micro_batch_size, cfg.actor.forward_micro_batch_size, sizes.actor_dp
        )
        nc, c_states, c_peak, _, _ = (
            model_gb(
                critic_path, True, cfg.critic.micro_batch_size, cfg.critic.forward_micro_batch_size, sizes.critic_dp
            )
            if M
            else (0, 0.0, 0.0, 0.0, None)
        )
        # hf: an unsharded copy
        engine = r.gpu_memory_utilization * gpu_gb if r.engine == "vllm" else na * bf / GB
        asleep = 0 if r.engine == "vllm" else engine  # vLLM sleeps while the trainer runs; the hf copy stays
        lines += [
            f"{head}: {asyppo.describe(layout)}",
            f"  batch: {r.prompts_per_step} prompts x {r.group_size} = {sizes.n_global} sequences/iteration, "
            f"{sizes.n_local} per actor rank; "
            f"actor {sizes.actor_steps} step(s)/epoch x {cfg.algo.ppo_epochs} epoch(s), "
            f"{sizes.actor_micro_steps} micro-batch(es) of "
            f"{sizes.actor_micro}/step/rank; critic {sizes.critic_steps} step(s)/iteration, "
            f"{sizes.critic_micro_steps} micro-batch(es) of {sizes.critic_micro}/step/rank",
            f"  actor   {na / 1e9:7.3f} B params over {sizes.actor_dp:2d} rank(s): "
            f"weights+grads+AdamW {a_states:8.2f}   training peak extra {a_peak:8.2f}",
            *(
                [
                    f"  critics {M} x {nc / 1e9:.3f} B params, each over {sizes.critic_dp:2d} rank(s): "
                    f"weights+grads+AdamW {held * c_states:8.2f} "
                    f"({held} per rank)   training peak extra {c_peak:8.2f}" + (" (one at a time)" if held > 1 else "")
                ]
                if M
                else []
            ),
            f"  rollout engine ({r.engine}): {engine:8.2f}"
            + (" (gpu_memory_utilization x gpu_memory_gb; asleep while training)" if r.engine == "vllm" else ""),
            *([kv_cache_line(a_config, engine, na * bf / GB, sizes.n_local)] if r.engine == "vllm" else []),
            f"  probe forward (the weight-sync check, while the engine is awake): {a_probe:8.2f}",
        ]
        if placement == "colocated":
            rollout, train = (
                a_states + held * c_states + engine + a_probe,
                a_states + held * c_states + max(a_peak, c_peak) + asleep,
            )
            lines.append(
                f"  every rank: rollout phase {rollout:8.2f}   training phase {train:8.2f}   "
                f"-> {verdict(max(rollout, train))}"
            )
            lines += [suggestion(rollout - engine)] if r.engine == "vllm" else []
        else:
            rollout, critic_rank = a_states + engine + a_probe, held * c_states + c_peak
            train = a_states + a_peak + asleep
            lines += [
                f"  actor ranks:  rollout phase {rollout:8.2f}   training phase {train:8.2f}   "
                f"-> {verdict(max(rollout, train))}",
                f"  critic ranks: values and training {critic_rank:8.2f}   -> {verdict(critic_rank)}",
            ]
            lines += [suggestion(rollout - engine)] if r.engine == "vllm" else []
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="overrides: dotted key=value, as for asyppo.py"
    )
    parser.add_argument("--config", help="YAML file of named presets (configs.yaml)")
    parser.add_argument("--preset", help="preset name in --config (default: the file's `default`)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="ranks to plan")
    parser.add_argument("--gpu-memory-gb", type=float, help="one GPU's memory (default: rollout.gpu_memory_gb)")
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_intermixed_args(argv)  # options may follow key=value overrides
    # only the trainer's own arguments reach parse_config: this tool's flags are not its options
    config_argv = [
        *(["--config", args.config] if args.config else []),
        *(["--preset", args.preset] if args.preset else []),
    ]
    cfg = asyppo.parse_config([*config_argv, *args.overrides])
    print(memory_plan(cfg, args.world_size, args.gpu_memory_gb))


if __name__ == "__main__":
    main()
