"""Where the mini-critics disagree: one self-contained HTML page of σ and AsyPPO's two masks, token by token.

    python tools/show_masks.py RUN_DIR [--out PAGE.html]     # default: RUN_DIR/masks.html

Reads RUN_DIR/tokens.jsonl, which asyppo.py writes every `token_steps` iterations (the iteration's first 4 responses).
Each token is shaded by σ_t = std_m V_m(s_t), the critics' disagreement in the state where the token was chosen
(Eq. 4), ranked within its iteration. Tokens that got no policy gradient (the lowest-σ share, Eq. 4) are struck
through in grey; tokens that got no entropy bonus (the highest-σ share, Eq. 5) have a red frame. Hovering a token shows
σ, V̄, Â and each critic's value. Above each response: the prompt, the gold answer and the reward. At the end: which
tokens, and which kinds of token, the masks took most often, against how often each occurs. No scripts, no network.
"""

import argparse
import collections
import html
import json
import re
import sys
from pathlib import Path

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.resp { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc; padding: .5em; }
.t { padding: 1px 0; }
.nograd { text-decoration: line-through; color: #777; }
.noent { outline: 2px solid #d00; }
.legend span { margin-right: 1.5em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
"""


def token_class(text):
    """digit, operator, word, formatting (whitespace, punctuation, LaTeX commands, special tokens) for the summary."""
    t = text.strip()
    if not t or t.startswith("<|") or t.startswith("\\") or re.fullmatch(r"[\s.,;:!?'\"`$&{}\[\]()#~_]+", t):
        return "formatting"
    if re.fullmatch(r"[0-9]+", t):
        return "digit"
    if re.fullmatch(r"[-+*/=<>^%|]+", t):
        return "operator"
    return "word" if re.search(r"[A-Za-z]", t) else "formatting"


def shade(rank):
    """σ's rank within its iteration (0 = the critics agree most, 1 = least) -> a background colour, blue to orange."""
    low, high = (200, 220, 255), (255, 190, 120)
    return "rgb({},{},{})".format(*(round(a + (b - a) * rank) for a, b in zip(low, high)))


def read_records(run_dir):
    path = Path(run_dir) / "tokens.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: no such file (asyppo.py writes it every token_steps iterations; token_steps=0 turns it off)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def page(records, title):
    by_step = collections.defaultdict(list)
    for r in records:
        by_step[r["step"]].append(r)
    counts = {key: collections.Counter() for key in ("all", "nograd", "noent")}
    kinds = {key: collections.Counter() for key in ("all", "nograd", "noent")}
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<p class=legend><span style='background:" + shade(0) + "'>σ lowest</span>"
        "<span style='background:" + shade(1) + "'>σ highest</span>"
        "<span class='nograd'>no policy gradient (Eq. 4: the critics agree)</span>"
        "<span class='noent'>no entropy bonus (Eq. 5: the critics disagree most)</span>"
        "<span>hover a token: σ, V̄, Â and each critic's value</span></p>",
        "<p>Steps: " + " ".join(f"<a href='#step{s}'>{s}</a>" for s in sorted(by_step)) + "</p>",
    ]
    for step in sorted(by_step):
        rows = by_step[step]
        rank = sigma_ranks(rows)
        body.append(f"<h2 id='step{step}'>iteration {step}</h2>")
        for r in rows:
            body.append(
                f"<p><b>prompt</b> {html.escape(r['prompt'])}<br><b>answer</b> {html.escape(str(r['answer']))} "
                f"&nbsp; <b>reward</b> {r['reward']:g} &nbsp; <b>tokens</b> {len(r['tokens'])}</p>"
            )
            spans = []
            for t, text in enumerate(r["tokens"]):
                classes = ["t"] + ["nograd"] * (r["adv_keep"][t] == 0) + ["noent"] * (r["ent_keep"][t] == 0)
                critics = ", ".join(f"V{m} {v[t]:.4f}" for m, v in enumerate(r["values"]))
                tip = f"σ {r['sigma'][t]:.4g}, V̄ {r['v_bar'][t]:.4f}, Â {r['adv'][t]:.3f}; {critics}"
                spans.append(
                    f"<span class='{' '.join(classes)}' style='background:{shade(rank[r['sigma'][t]])}' "
                    f"title='{html.escape(tip, quote=True)}'>{html.escape(text)}</span>"
                )
                for key, taken in (("all", True), ("nograd", r["adv_keep"][t] == 0), ("noent", r["ent_keep"][t] == 0)):
                    if taken:
                        counts[key][text] += 1
                        kinds[key][token_class(text)] += 1
            body.append("<div class=resp>" + "".join(spans) + "</div>")
    body.append(summary(counts, kinds))
    head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    return head + f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n"


def summary(counts, kinds):
    """What the masks took, by kind of token and by token, against each one's share of all recorded tokens."""
    total = {key: max(1, sum(c.values())) for key, c in kinds.items()}
    rows = "".join(
        f"<tr><td style='text-align:left'>{kind}</td>"
        + "".join(f"<td>{kinds[key][kind] / total[key]:.1%}</td>" for key in ("all", "nograd", "noent"))
        + "</tr>"
        for kind in ("digit", "operator", "word", "formatting")
    )
    out = [
        "<h2>Summary over every recorded iteration</h2>",
        "<table><tr><th>kind of token</th><th>share of all tokens</th><th>of tokens with no policy gradient</th>"
        f"<th>of tokens with no entropy bonus</th></tr>{rows}</table>",
    ]
    for key, what in (("nograd", "no policy gradient"), ("noent", "no entropy bonus")):
        top = "".join(
            f"<tr><td style='text-align:left'><code>{html.escape(repr(text))}</code></td><td>{n}</td>"
            f"<td>{n / counts['all'][text]:.0%}</td></tr>"
            for text, n in counts[key].most_common(20)
        )
        out.append(
            f"<h3>Tokens most often given {what}</h3><table><tr><th>token</th><th>times</th>"
            f"<th>of its occurrences</th></tr>{top}</table>"
        )
    return "\n".join(out)


def sigma_ranks(rows):
    """σ -> its rank among these responses' tokens, 0 (the critics agree most) to 1; equal σ share the last rank."""
    sigmas = sorted(x for r in rows for x in r["sigma"])
    return {x: i / max(1, len(sigmas) - 1) for i, x in enumerate(sigmas)}


def picture(records, out, responses=2, width=1000):
    """A PNG of the first responses as the page draws them (for the README; the page itself has no picture). Needs
    Pillow (tensorboard installs it): `pip install pillow`."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        sys.exit("--png needs Pillow: pip install pillow")
    font, pad, line_h = ImageFont.load_default(size=15), 10, 26
    records = [r for r in records if r["step"] == records[0]["step"]][:responses]
    rank = sigma_ranks(records)
    legend = "shade: sigma, blue = the critics agree, orange = they disagree;  grey + struck: no policy gradient"
    lines = [(pad, legend + " (Eq. 4);"), (pad + line_h, "red frame: no entropy bonus (Eq. 5)")]  # (y, text)
    items, y = [], pad + 2 * line_h  # (x, y, width, text, record, token index): laid out first, drawn after
    for r in records:
        question = " ".join(re.sub(r"<\|[^|]*\|>", " ", r["prompt"]).split())[-90:]  # special tokens out
        lines.append((y, f"prompt: ...{question}   answer: {r['answer']}   reward: {r['reward']:g}"))
        x, y = pad, y + line_h
        for t, text in enumerate(r["tokens"]):
            shown = text.replace("\n", "\\n").replace("\ufffd", "?") or " "  # the default font has neither glyph
            w = font.getlength(shown) + 2
            if x + w > width - pad:
                x, y = pad, y + line_h
            items.append((x, y, w, shown, r, t))
            x += w
        y += line_h + pad
    image = Image.new("RGB", (width, y + pad), "white")
    draw = ImageDraw.Draw(image)
    for at, text in lines:
        draw.text((pad, at), text, fill="black", font=font)
    for x, y, w, text, r, t in items:
        draw.rectangle([x, y, x + w, y + line_h - 4], fill=shade(rank[r["sigma"][t]]))
        nograd, noent = r["adv_keep"][t] == 0, r["ent_keep"][t] == 0
        draw.text((x + 1, y + 3), text, fill="#777" if nograd else "black", font=font)
        if nograd:
            draw.line([x, y + line_h // 2 - 1, x + w, y + line_h // 2 - 1], fill="#777", width=1)
        if noent:
            draw.rectangle([x, y, x + w, y + line_h - 4], outline="#d00", width=2)
    image.save(out)
    print(f"{out}: {len(records)} responses of iteration {records[0]['step']}, {image.width}x{image.height}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an asyppo.py output_dir holding tokens.jsonl")
    parser.add_argument("--out", help="the page to write (default: RUN_DIR/masks.html)")
    parser.add_argument("--png", help="also draw the first recorded iteration's first 2 responses into this PNG")
    args = parser.parse_args(argv)
    records = read_records(args.run_dir)
    if args.png:
        picture(records, args.png)
    out = Path(args.out or Path(args.run_dir) / "masks.html")
    out.write_text(page(records, f"AsyPPO masks: {Path(args.run_dir).resolve().name}"))
    steps = len({r["step"] for r in records})
    print(f"{out}: {len(records)} responses of {steps} iteration(s), {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
