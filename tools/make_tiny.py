"""Write the tiny preset's data and base models, so that the toy runs through the paper run's code path.

    python tools/make_tiny.py                                  # data/tiny/{train.jsonl, actor, critic}
    python tools/make_tiny.py --task add2 --out data/tiny-add2
    python asyppo.py --config configs.yaml --preset tiny        # then train on them (CPU, offline)

train.jsonl: one {"question": "3+5=", "final_answer": "8"} per line, drawn at random. actor/ and critic/: directories
that load with transformers' from_pretrained: a char-level tokenizer, a 2-layer Qwen3 actor and a 1-layer Qwen3 critic
base (asymmetric). A base model is what RL starts from: here a random Qwen3 given a short SUPERVISED warm start on the
task, a stand-in for pretraining (pure RL from random weights collapses on this task). The actor's warm start stops once
it writes the right solution --base-accuracy of the time on 256 held-out problems; the critic's base gets as many steps.
bench/tiny.md: why each number here is what it is.
"""

import argparse
import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM


def problem(task, rng):
    """(prompt, answer, worked solution). The solution is only for the supervised warm start; RL is rewarded on the
    answer. "add": 3+5= -> 08 (two digits, the length of a response: no room for junk after the answer).
    "add2": 47+38= -> 7+8=15;4+3+1=8;\\boxed{85} (units with their carry, then tens: credit assignment matters)."""
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


def char_tokenizer():
    """One token per printable character (99 tokens with the 3 specials); left padding, for generation."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()  # decode without spaces between characters
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        padding_side="left",
    )  # fmt: skip


def qwen3_config(name, tokenizer, critic_layers=1):
    """A 2-layer actor and a smaller critic base (head_dim 32: vLLM's CPU minimum)."""
    size = {
        "actor": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        "critic": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=critic_layers, num_attention_heads=1),
    }[name]
    return Qwen3Config(
        vocab_size=len(tokenizer), head_dim=32, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **size,
    )  # fmt: skip


def supervised_batch(tokenizer, pairs, eos=True):
    """(prompt, solution) pairs -> left-padded model inputs and labels: the solution's tokens, -100 elsewhere."""
    ids = [tokenizer.encode(p + a, add_special_tokens=False) + [tokenizer.eos_token_id] * eos for p, a in pairs]
    T = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(x)) + x for x in ids])  # [n, T]
    labels = torch.tensor([[-100] * (T - len(x) + len(p)) + x[len(p) :] for x, (p, _) in zip(ids, pairs)])
    attn = (torch.arange(T)[None] >= torch.tensor([T - len(x) for x in ids])[:, None]).long()
    return dict(input_ids=input_ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)), labels


@torch.no_grad()
def accuracy(model, tokenizer, pairs):
    """How often sampling at temperature 1 writes each solution, exactly: the mean of P(solution | prompt)."""
    inputs, labels = supervised_batch(tokenizer, pairs, eos=False)
    logp = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]  # token t+1 is predicted at position t
    token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    return token_logp.sum(-1).exp().mean().item()


def build_models(out, task, seed, base_accuracy, max_steps, critic_layers):
    tokenizer = char_tokenizer()
    rng, held_out_rng = random.Random(seed), random.Random(seed + 1)
    held_out = [problem(task, held_out_rng)[::2] for _ in range(256)]
    steps = max_steps
    for name in ("actor", "critic"):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(qwen3_config(name, tokenizer, critic_layers))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(steps):  # supervised warm start: loss on the solution's tokens only
            if name == "actor" and accuracy(model, tokenizer, held_out) >= base_accuracy:
                steps = step  # the critic's base gets as many steps
                break
            inputs, labels = supervised_batch(tokenizer, [problem(task, rng)[::2] for _ in range(64)])
            model(**inputs, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        if name == "actor":
            print(
                f"base actor after {steps} supervised warm-start steps (not RL): writes the right solution "
                f"{accuracy(model, tokenizer, held_out):.2f} of the time (asked: {base_accuracy})"
            )
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        print(out / name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="default: data/tiny (add) or data/tiny-add2 (add2)")
    p.add_argument("--task", choices=["add", "add2"], default="add")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prompts", type=int, default=50_000, help="rows of train.jsonl (the preset uses 128 x 300)")
    p.add_argument("--base-accuracy", type=float, default=None, help="default: 0.5 (add), 0.4 (add2)")
    p.add_argument("--warm-start-steps", type=int, default=None, help="at most; default: 500 (add), 800 (add2)")
    p.add_argument("--critic-layers", type=int, default=1)
    args = p.parse_args(argv)
    add = args.task == "add"
    out = Path(args.out or ("data/tiny" if add else "data/tiny-add2"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{args.seed}-data")
    with open(out / "train.jsonl", "w") as f:
        for _ in range(args.prompts):
            prompt, answer, _ = problem(args.task, rng)
            f.write(json.dumps({"question": prompt, "final_answer": answer}) + "\n")
    print(out / "train.jsonl")
    base_accuracy = args.base_accuracy if args.base_accuracy is not None else (0.5 if add else 0.4)
    steps = args.warm_start_steps if args.warm_start_steps is not None else (500 if add else 800)
    build_models(out, args.task, args.seed, base_accuracy, steps, args.critic_layers)


if __name__ == "__main__":
    main()
