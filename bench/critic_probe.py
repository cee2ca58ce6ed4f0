"""Can a critic learn the return on tiny-add2 at all? An offline probe, outside RL, and one RL run from its critic.

    python bench/critic_probe.py                        # seeds 1-3, one after another (~15-25 min each on 2 cores)
    python bench/critic_probe.py --seeds 2 --threads 1  # one seed: start seeds side by side; finished ones are reused
    python bench/critic_probe.py --responses 40960 --lr 1e-3 --targets return   # the report's second setting
    python bench/critic_probe.py --targets mistake-then-return                   # and its third
    python bench/critic_probe.py --targets mistake-then-rl                       # and its fourth: inside RL
    python bench/critic_probe.py --targets mistake-then-rl --critics l2          # and its fifth

Each seed's result is saved under bench/runs/critic_probe; bench/critic_probe.md is rewritten from all saved results,
one section per setting.

In the RL run every mini-critic explains ~0 of the return on add2 (README). This asks whether that is the RL loop's
fault or the critic's. It holds the policy fixed, the tiny-add2 base actor of a seed (`tools/make_tiny.py --task add2
--seed S`, into a temporary directory), samples responses from it with the rollout's settings, scores them with
math-verify, and trains each critic on 80% of them with the trainer's own code (critic_values, value_loss,
make_optimizer, clip_and_step: the critic preset's lr and clipping, 32 sequences per step) on a critic made as
load_critic makes it, without FSDP (in one process it only adds overhead). It reports the
explained variance on the other 20% as training goes on. In RL each mini-critic has taken 800 such steps by
iteration 200 (64 prompts x 4 responses / 2 shards / 32 per step x 200), ppo's single critic 1,600.

Targets:
* return: the final reward on every token, what the trainer regresses on (GAE with γ = λ = 1);
* mistake: 1 on the tokens after the response has first left the worked solution, else 0. The value V(s_t) of a
  state depends on this; the target gives it densely, token by token, instead of through one reward per response.
* mistake-then-return: the mistake flag first, then the return: does a critic that can already check a written sum
  learn the value within an RL run's critic steps?
* mistake-then-rl: the mistake flag first, then the critic is saved and an RL run starts from it: the trainer itself
  (`asyppo.py --preset tiny-add2 model.actor=<this seed's base actor> model.critic=<the saved critic>
  data.train_path=<this seed's train.jsonl>`, both critics from it), and the report gives the critics' explained
  variance as the run logs it. The trainer no longer writes diagnostics.jsonl (the tokens the σ masks took most
  often), so the report's table of where the masks fall is there only for results saved before.
And two oracles that are fitted on the training responses' returns and tested on the others: the success rate by
token position, and by position and whether a mistake was already made.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import asyppo as A  # noqa: E402
import make_tiny  # noqa: E402  the tiny task's problems and tokenizer, and its base models

CRITICS = {  # name -> (its base, as below in main)
    "l1": "mini-critic, 1 layer (asyppo's)",
    "l2": "mini-critic, 2 layers",
    "actor": "the actor's checkpoint (ppo's)",
}
RL_ITERATIONS = 300  # mistake-then-rl: the bench's run length (the actor's cosine lr follows it)
FILES = ("metrics.jsonl", "diagnostics.jsonl")  # the second: only from trainers older than tools/make_tiny.py
RL_WINDOWS = [(0, 50), (50, 100), (100, 150), (150, 200), (175, 200), (250, 300)]  # critics' EV averaged over these
THEN_RETURN_STEPS = 2000  # mistake-then-return: steps on the return after the mistake flag
CHECKPOINTS = [
    200,
    800,
    2000,
    4000,
    8000,
    12000,
]  # optimizer steps at which the held-out explained variance is measured


def sample_responses(cfg, actor_path, n, seed):
    """n responses of the base actor, G per prompt, with the rollout's sampling settings: (prompt ids, response ids
    ending in <|im_end|> or cut at max_new_tokens, reward, mistake flag of each token)."""
    tok = make_tiny.char_tokenizer()
    actor = AutoModelForCausalLM.from_pretrained(actor_path, dtype=torch.float32).eval()
    r, G = cfg.rollout, cfg.rollout.group_size
    rng = random.Random(f"probe-{seed}")
    torch.manual_seed(seed)
    rows = []
    while len(rows) < n:
        problems = [make_tiny.problem("add2", rng) for _ in range(r.prompts_per_step)]
        prompts = [tok.encode(q, add_special_tokens=False) for q, _, _ in problems for _ in range(G)]
        ids, attn = A.left_pad(prompts, tok.pad_token_id, "cpu")
        with torch.no_grad():
            out = actor.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                max_new_tokens=r.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        for i, response in enumerate(out[:, ids.shape[1] :].tolist()):
            if tok.eos_token_id in response:
                response = response[: response.index(tok.eos_token_id) + 1]
            _, answer, solution = problems[i // G]
            reward = A.math_reward(tok.decode(response, skip_special_tokens=True), answer)
            rows.append((prompts[i], response, reward, mistake_flags(response, solution, tok)))
    return rows[:n]


def mistake_flags(response, solution, tok):
    """For each response token t: has an earlier token already left the worked solution? (one character per token)"""
    flags, wrong = [], False
    for t, token in enumerate(response):
        flags.append(float(wrong))  # V(s_t) values the state before token t
        wrong = wrong or t >= len(solution) or tok.decode([token]) != solution[t]
    return flags


def batch_tensors(rows, target, pad_id, L):
    """input_ids, attn [n, P+L] (left-padded prompt | right-padded response), mask [n, L] and the target [n, L]."""
    P = max(len(p) for p, _, _, _ in rows)
    input_ids = torch.full((len(rows), P + L), pad_id)
    attn, mask, y = torch.zeros_like(input_ids), torch.zeros(len(rows), L), torch.zeros(len(rows), L)
    for i, (prompt, response, reward, flags) in enumerate(rows):
        input_ids[i, P - len(prompt) : P + len(response)] = torch.tensor(prompt + response)
        attn[i, P - len(prompt) : P + len(response)] = 1
        mask[i, : len(response)] = 1
        y[i, : len(response)] = torch.tensor(flags if target == "mistake" else [reward] * len(response))
    return input_ids, attn, mask, y


def oracle_ev(train, test, key):
    """Explained variance on `test` of the mean return of the training tokens that share key(position, mistake)."""
    sums = {}
    for _, _, reward, flags in train:
        for t, wrong in enumerate(flags):
            s, c = sums.get(key(t, wrong), (0.0, 0))
            sums[key(t, wrong)] = (s + reward, c + 1)
    mean = sum(row[2] for row in train) / len(train)
    pred, ret = [], []
    for _, _, reward, flags in test:
        for t, wrong in enumerate(flags):
            s, c = sums.get(key(t, wrong), (mean, 1))
            pred.append(s / c)
            ret.append(reward)
    pred, ret = torch.tensor(pred), torch.tensor(ret)
    return A.explained_variance(pred, ret, torch.ones_like(ret))


def held_out_ev(critic, tensors, L):
    input_ids, attn, mask, y = tensors
    with torch.no_grad():
        values = [A.critic_values(critic, input_ids[i : i + 64], attn[i : i + 64], L) for i in range(0, len(mask), 64)]
    return A.explained_variance(torch.cat(values), y, mask)


def probe(cfg, critic_path, train, test, target, steps, seed, log, save=None):
    """Train a fresh critic from critic_path on `train` -> [(step, held-out EV)]. Target "return" or "mistake":
    `steps` optimizer steps on it. "mistake-then-return": `steps` on the mistake flag (a critic that has learned to
    check a written sum, as a pretrained critic might bring), then THEN_RETURN_STEPS on the return, from a fresh
    optimizer; the curve is the second stage's. "mistake-then-rl": the mistake flag, then the critic is written to
    `save` (an HF directory, value head included) for run_rl; the curve is the flag's."""
    tok, L, C = make_tiny.char_tokenizer(), cfg.rollout.max_new_tokens, cfg.critic
    config = AutoConfig.from_pretrained(critic_path, num_labels=1)
    config.classifier_dropout = 0.0
    torch.manual_seed(seed)  # the value head's initialisation, as load_critic
    transformers.utils.logging.set_verbosity_error()  # no report that the value head is new: it is, by design
    critic = A.for_training(AutoModelForTokenClassification.from_pretrained(critic_path, config=config), cfg)
    stages = {"mistake-then-return": [("mistake", steps), ("return", THEN_RETURN_STEPS)]}.get(
        target, [("mistake" if target == "mistake-then-rl" else target, steps)]
    )
    rng = random.Random(seed)
    for stage_target, stage_steps in stages:
        trainee = A.Trainee(critic, *A.make_optimizer(critic, C, stage_steps), mesh=None)  # no FSDP: no mesh
        test_tensors = batch_tensors(test, stage_target, tok.pad_token_id, L)
        curve, order, step = [], [], 0
        while step < stage_steps:
            if len(order) < C.sequences_per_step:  # a new epoch over the training responses
                order = list(range(len(train)))
                rng.shuffle(order)
            idx, order = order[: C.sequences_per_step], order[C.sequences_per_step :]
            input_ids, attn, mask, y = batch_tensors([train[i] for i in idx], stage_target, tok.pad_token_id, L)
            for mb in torch.arange(len(idx)).split(C.micro_batch_size):  # gradient accumulation, as update_critics
                values = A.critic_values(critic, input_ids[mb], attn[mb], L)
                loss = A.value_loss(values, y[mb], mask[mb], cfg.algo.loss_agg)
                (loss * len(mb) / len(idx)).backward()
            A.clip_and_step(trainee, C.max_grad_norm)
            step += 1
            if step in CHECKPOINTS or step == stage_steps:
                curve.append((step, held_out_ev(critic, test_tensors, L)))
                log(f"    {stage_target}, step {step}: held-out explained variance {curve[-1][1]:.3f}")
    if save:
        critic.save_pretrained(save)
        tok.save_pretrained(save)
    return curve


def run_rl(actor_path, critic_path, train_path, seed, steps, threads, out):
    """The trainer on tiny-add2 from this seed's base actor and prompts, both critics from critic_path: its
    metrics.jsonl and diagnostics.jsonl, each a list of dicts (diagnostics: [] where the trainer wrote none)."""
    metrics = out / "metrics.jsonl"
    if not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        cmd = [sys.executable, "asyppo.py", "--config", "configs.yaml", "--preset", "tiny-add2", f"seed={seed}"]
        cmd += [f"max_steps={steps}", f"model.actor={actor_path}", f"model.critic={critic_path}"]
        cmd += [f"data.train_path={train_path}", f"output_dir={out}"]
        print("  +", " ".join(cmd), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads or os.cpu_count())}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return [
        [json.loads(line) for line in (out / f).read_text().splitlines()] if (out / f).exists() else [] for f in FILES
    ]


def build_base(seed, out, threads, critic_layers=1):
    """tools/make_tiny.py --task add2 --seed S (the tiny-add2 preset's base of that seed) into `out`: -> the paths of
    its actor, its critic base and its train.jsonl."""
    cmd = [sys.executable, "tools/make_tiny.py", "--task", "add2", "--seed", str(seed), "--out", str(out)]
    cmd += ["--critic-layers", str(critic_layers)]
    print("  +", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads or os.cpu_count())}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return str(out / "actor"), str(out / "critic"), str(out / "train.jsonl")


TOKEN_CLASSES = {  # for where the σ masks fall (diagnostics.jsonl): one character per token on the tiny tasks
    "digits": set("0123456789"),
    "+ = ;": set("+=;"),
    "\\boxed{} and im_end": set("\\boxed{}") | {"<|im_end|>"},  # (no "|" in a markdown table cell)
}


def rl_summary(metrics, diagnostics):
    """What the report shows of an RL run: the critics' mean explained variance and the reward, by window, and the
    share of each token class's occurrences that the advantage mask and the entropy filter took over the run (among
    the tokens diagnostics.jsonl lists last: the 20 most masked and the 20 most filtered)."""

    def mean(key_ok, a, b):
        xs = [v for m in metrics[a:b] for k, v in m.items() if key_ok(k) and math.isfinite(v)]
        return sum(xs) / len(xs) if xs else math.nan

    ev = {f"{a}-{b - 1}": mean(lambda k: k.endswith("/explained_variance"), a, b) for a, b in RL_WINDOWS}
    reward = {
        f"{a}-{b - 1}": mean(lambda k: k == "reward/mean", a, b)
        for a, b in [(0, 25), (len(metrics) - 25, len(metrics))]
    }
    if not diagnostics:  # the trainer writes no diagnostics.jsonl any more
        return dict(ev=ev, reward=reward, masks={})
    last, masks = diagnostics[-1], {}
    for kind, label in (("adv_masked", "advantage mask"), ("ent_filtered", "entropy filter")):
        for name, chars in TOKEN_CLASSES.items():
            rows = [(count, count / share) for token, count, share in last[kind] if token in chars and share > 0]
            masks[f"{label}: {name}"] = sum(c for c, _ in rows) / sum(n for _, n in rows) if rows else math.nan
    return dict(ev=ev, reward=reward, masks=masks)


def command(a):
    """The command line of one probe setting (every option that changes its numbers), for the report."""
    return (
        f"python bench/critic_probe.py --responses {a['responses']} --steps {a['steps']} --lr {a['lr']} "
        f"--critics {' '.join(a['critics'])} --targets {' '.join(a['targets'])}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--responses", type=int, default=20480, help="sampled from the base actor; 80%% train, 20%% test")
    p.add_argument("--steps", type=int, default=16000, help="critic optimizer steps of 32 sequences")
    p.add_argument("--lr", type=float, default=None, help="critic lr (default: the tiny-add2 preset's)")
    p.add_argument("--critics", nargs="+", default=["l1", "actor"], choices=list(CRITICS))
    p.add_argument(
        "--targets",
        nargs="+",
        default=["return", "mistake"],
        choices=["return", "mistake", "mistake-then-return", "mistake-then-rl"],
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "critic_probe.md"), help="the report of every saved probe")
    p.add_argument("--runs", default=str(ROOT / "bench" / "runs" / "critic_probe"), help="one result file per seed")
    args = p.parse_args()
    if args.lr is None:
        args.lr = A.parse_config(["--config", str(ROOT / "configs.yaml"), "--preset", "tiny-add2"]).critic.lr
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = {k: getattr(args, k) for k in ("responses", "steps", "lr", "critics", "targets")}
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        saved = runs / f"{command(setting).split(' ', 2)[2].replace(' ', '_').replace('--', '')}_seed{seed}.json"
        if saved.exists():  # finished by an earlier invocation
            continue
        seed_start = time.time()
        cfg = A.parse_config(["--config", str(ROOT / "configs.yaml"), "--preset", "tiny-add2", f"seed={seed}"])
        cfg.critic.lr = args.lr
        work = Path(tempfile.mkdtemp(prefix=f"critic_probe_s{seed}_"))  # the base models and the saved critics
        actor, critic1, train_path = build_base(seed, work / "layers1", args.threads)
        critic2 = None
        if "l2" in args.critics:  # the same actor again, and a 2-layer critic base
            critic2 = build_base(seed, work / "layers2", args.threads, critic_layers=2)[1]
        rows = sample_responses(cfg, actor, args.responses, seed)
        train, test = rows[: len(rows) * 4 // 5], rows[len(rows) * 4 // 5 :]
        reward = sum(r[2] for r in rows) / len(rows)
        print(f"seed {seed}: {len(rows)} responses, mean reward {reward:.3f}", flush=True)
        oracles = {
            "position": oracle_ev(train, test, lambda t, wrong: t),
            "position + mistake made": oracle_ev(train, test, lambda t, wrong: (t, wrong)),
        }
        print(f"  oracles: {oracles}", flush=True)
        base = {"l1": critic1, "l2": critic2, "actor": actor}
        curves = []
        for key in args.critics:
            for target in args.targets:
                print(f"  {CRITICS[key]}, target {target}:", flush=True)
                t0 = time.time()
                save = work / f"checked_{key}" if target == "mistake-then-rl" else None
                curve = probe(cfg, base[key], train, test, target, args.steps, seed, print, save)
                n = args.steps + THEN_RETURN_STEPS * (target == "mistake-then-return")
                print(f"  ({(time.time() - t0) / n * 1000:.1f} ms per step)", flush=True)
                curves.append(dict(critic=CRITICS[key], target=target, curve=curve))
                if save:
                    rl_out = runs / "rl" / f"{saved.stem}_{key}"
                    logs = run_rl(actor, save, train_path, seed, RL_ITERATIONS, args.threads, rl_out)
                    curves[-1]["rl"] = rl_summary(*logs)
                    print(f"  RL run: {curves[-1]['rl']}", flush=True)
        result = dict(setting=setting, seed=seed, reward=reward, oracles=oracles, curves=curves)
        saved.write_text(json.dumps(dict(result, minutes=(time.time() - seed_start) / 60)))
        shutil.rmtree(work)
    write_report(runs, Path(args.out))


def write_report(runs, out):
    """bench/critic_probe.md: every probe saved in `runs`, one section per setting, one row per seed and curve."""
    by_setting = {}
    for f in sorted(runs.glob("*.json"), key=lambda f: f.stat().st_mtime):  # settings in the order they were run
        r = json.loads(f.read_text())
        by_setting.setdefault(command(r["setting"]), []).append(r)
    lines = [
        "# Critic probe: can a critic learn the return on tiny-add2? (offline, fixed policy)",
        "",
        "Held-out explained variance after N critic optimizer steps of 32 sequences. By iteration 200 of a "
        "tiny-add2 RL run each mini-critic has taken 800, ppo's single critic 1,600. Target `return`: the explained "
        "variance of the held-out return, the critic's job. Target `mistake`: the explained variance of the held-out "
        "mistake flag itself (can the network compute it?). Target `mistake-then-return`: `--steps` on the mistake "
        "flag, then the steps in the columns on the return; the explained variance of the return. Target "
        "`mistake-then-rl`: the mistake flag's curve, then an RL run from that critic (its own table). The oracles are "
        "fitted on the training responses' returns: the success rate by token position, and by position and whether "
        "a mistake was already made.",
    ]
    for cmd, results in by_setting.items():
        results.sort(key=lambda r: r["seed"])
        steps = sorted({s for r in results for c in r["curves"] for s, _ in c["curve"]})  # targets may differ in steps
        lo, hi = min(round(r["minutes"]) for r in results), max(round(r["minutes"]) for r in results)
        minutes = f"{lo}" if lo == hi else f"{lo}-{hi}"  # "13" or "12-14"
        lines += [
            "",
            f"## `{cmd}`",
            "",
            f"Seeds {', '.join(str(r['seed']) for r in results)}; {minutes} min of wall time per seed.",
            "",
        ]
        lines += [
            "| seed | base reward | oracle: position | oracle: position + mistake made | critic | target | "
            + " | ".join(f"{s} steps" for s in steps)
            + " |",
            "|---|---|---|---|---|---|" + "---|" * len(steps),
        ]
        for r in results:
            for c in r["curves"]:
                at = dict(c["curve"])
                evs = " | ".join(f"{at[s]:.3f}" if s in at else "–" for s in steps)
                o = r["oracles"]
                lines.append(
                    f"| {r['seed']} | {r['reward']:.3f} | {o['position']:.3f} | {o['position + mistake made']:.3f} | "
                    f"{c['critic']} | {c['target']} | {evs} |"
                )
        rl = [(r["seed"], c) for r in results for c in r["curves"] if "rl" in c]
        if rl:  # mistake-then-rl: what the trainer logged in the RL run from each saved critic
            ev_cols, reward_cols = list(rl[0][1]["rl"]["ev"]), list(rl[0][1]["rl"]["reward"])
            lines += [
                "",
                f"Then `asyppo.py --preset tiny-add2`, {RL_ITERATIONS} iterations, from the seed's base actor with "
                "both critics from the saved one: the critics' explained variance as the trainer logs it (the mean of "
                "the two critics, over the iterations named), and the reward.",
                "",
                "| seed | critic | "
                + " | ".join(f"EV, its. {w}" for w in ev_cols)
                + " | "
                + " | ".join(f"reward, its. {w}" for w in reward_cols)
                + " |",
                "|---|---|" + "---|" * (len(ev_cols) + len(reward_cols)),
            ]
            for seed, c in rl:
                cells = [c["rl"]["ev"][w] for w in ev_cols] + [c["rl"]["reward"][w] for w in reward_cols]
                lines.append(f"| {seed} | {c['critic']} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
            mask_cols = list(dict.fromkeys(k for _, c in rl for k in c["rl"]["masks"]))  # none without diagnostics
            if mask_cols:
                lines += [
                    "",
                    "Where the σ masks fall in those runs: the share of each token class's occurrences that the "
                    "advantage mask (lowest σ) and the entropy filter (highest σ) took over the run, from the last "
                    "line of `diagnostics.jsonl` (among the 20 tokens it lists for each). Both take 20% of all tokens.",
                    "",
                    "| seed | critic | " + " | ".join(mask_cols) + " |",
                    "|---|---|" + "---|" * len(mask_cols),
                ]
            for seed, c in rl if mask_cols else []:
                masks = [c["rl"]["masks"].get(k, math.nan) for k in mask_cols]
                lines.append(f"| {seed} | {c['critic']} | " + " | ".join(f"{x:.3f}" for x in masks) + " |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
