"""Write the data the presets read, from the public hub datasets: the training set and the six evaluation sets.

    pip install datasets                          # only for the hub; --from-dir needs nothing (parquet: pyarrow)
    python tools/prepare_data.py                  # all seven, into data/
    python tools/prepare_data.py --only aime24 aime25 --out data
    python tools/prepare_data.py --from-dir DIR   # offline: DIR/<name>.jsonl (or .parquet) in the source's own fields

writes data/deepmath_103k.jsonl ({"question", "final_answer", "difficulty"}: DeepMath-103K's own names, which
configs.yaml's data.prompt_key / answer_key / difficulty_key read; the three R1 solutions per row are left out) and
data/eval/{math500,olympiadbench,minerva_math,amc23,aime24,aime25}.jsonl ({"problem", "answer"}: eval.prompt_key /
eval.answer_key). Each public copy of these sets names its fields its own way; SOURCES below is the whole mapping.
The gold answer is written as the source writes it (a number stays a number: the trainer reads str(answer)), with one
exception: OlympiadBench's final_answer is a list of strings, written as its items joined by ", " (one item: the
item itself). That is the very text asyppo.gold_texts makes of str(list), so the reward is the same either way.
Every file is written whole or not at all (a temporary file, renamed), and a row without its fields stops the run
with a one-line error naming the source, the row and the fields it has.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# name: (hub id, config(s), split, prompt field, answer field, output file under --out). Field names and splits as
# read from each dataset's card or from public loaders of it (ids kept as written in the card):
#   DeepMath-103K: card, features question/final_answer/difficulty/topic/r1_solution_1..3, split train (103,110 rows).
#   MATH-500: card (as mirrored), features problem/solution/answer/subject/level/unique_id, split test (500).
#   OlympiadBench: Hothan's upload (the benchmark's authors), config OE_TO_maths_en_COMP = open-ended, text-only,
#     maths, English, competition: 674 rows in split train; question, solution, final_answer (a list), context, ...
#     The problem is `question` alone: `context` (a shared preamble, used by the physics subsets) is not prepended.
#   Minerva Math: card, features question/answer, split test (272).
#   AMC 2023: split test (40 rows), question/answer (also id, url), read from public loaders, not from its card (not
#     stored where we looked); its answer's type (string or float) is unverified: it is written as it comes.
#   AIME 2024: card, features id/problem/solution/answer (a string)/url/year, split train (30).
#   AIME 2025: configs AIME2025-I and AIME2025-II (15 rows each), split test, question/answer; both are written.
SOURCES = {
    "deepmath_103k": ("zwhe99/DeepMath-103K", None, "train", "question", "final_answer", "deepmath_103k.jsonl"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "eval/math500.jsonl"),
    "olympiadbench": (
        "Hothan/OlympiadBench",
        "OE_TO_maths_en_COMP",
        "train",
        "question",
        "final_answer",
        "eval/olympiadbench.jsonl",
    ),
    "minerva_math": ("math-ai/minervamath", None, "test", "question", "answer", "eval/minerva_math.jsonl"),
    "amc23": ("math-ai/amc23", None, "test", "question", "answer", "eval/amc23.jsonl"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "eval/aime24.jsonl"),
    "aime25": (
        "opencompass/AIME2025",
        ("AIME2025-I", "AIME2025-II"),
        "test",
        "question",
        "answer",
        "eval/aime25.jsonl",
    ),
}
TRAIN = "deepmath_103k"  # written with its own field names and its difficulty; every other set as {problem, answer}


def gold(answer):
    """The gold answer as the source writes it; a list of strings (OlympiadBench) becomes its items joined by ", ".
    >>> gold("2\\\\sqrt{2}"), gold(204), gold(["$69$", "$84$"]), gold(["$\\\\frac{1}{2}$"])
    ('2\\\\sqrt{2}', 204, '$69$, $84$', '$\\\\frac{1}{2}$')"""
    return ", ".join(answer) if isinstance(answer, list) else answer


def load_hub(hub_id, configs, split, columns):
    """The rows of a hub dataset (one config, or several concatenated), with only `columns`."""
    try:
        import datasets
    except ImportError:
        sys.exit("prepare_data: reading the hub needs the datasets package: pip install datasets (or use --from-dir)")
    rows = []
    for config in configs if isinstance(configs, tuple) else (configs,):
        try:
            ds = datasets.load_dataset(hub_id, config, split=split)
        except Exception as e:  # noqa: BLE001 (not found, offline without a cache, ...: one line, not a traceback)
            sys.exit(f"prepare_data: {hub_id} (config {config}, split {split}): {str(e).strip().splitlines()[0][:300]}")
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            sys.exit(f"prepare_data: {hub_id} (config {config}): no field(s) {missing}; it has {ds.column_names}")
        rows += list(ds.select_columns(columns))  # DeepMath's R1 solutions (~5 GB) never become Python strings
    return rows


def load_local(path):
    """The rows of a jsonl or parquet file, in the source's own field layout."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit(f"prepare_data: reading {path} needs the pyarrow package: pip install pyarrow")
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def normalise(name, rows, where):
    """Source rows -> the rows the presets read, gold answers unchanged (but for gold()'s list join)."""
    _, _, _, prompt, answer, _ = SOURCES[name]
    need = [prompt, answer] + (["difficulty"] if name == TRAIN else [])
    out = []
    for i, row in enumerate(rows, 1):
        missing = [k for k in need if row.get(k) is None]
        if missing:
            sys.exit(f"prepare_data: {where}: row {i}: no field(s) {missing}; it has {sorted(row)}")
        if name == TRAIN:
            out.append({"question": row[prompt], "final_answer": gold(row[answer]), "difficulty": row["difficulty"]})
        else:
            out.append({"problem": row[prompt], "answer": gold(row[answer])})
    if not out:
        sys.exit(f"prepare_data: {where}: no rows")
    return out


def write_jsonl(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)  # a file is there whole, or not at all


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(SOURCES),
        metavar="NAME",
        help=f"write only these (default: all): {' '.join(SOURCES)}",
    )
    p.add_argument(
        "--from-dir",
        type=Path,
        metavar="DIR",
        help="read DIR/<name>.jsonl or DIR/<name>.parquet, in the source's own fields, instead of the hub",
    )
    args = p.parse_args(argv)
    for name in args.only or SOURCES:
        hub_id, configs, split, prompt, answer, out_file = SOURCES[name]
        if args.from_dir:
            found = [args.from_dir / f"{name}{ext}" for ext in (".jsonl", ".parquet")]
            found = [f for f in found if f.is_file()]
            if not found:
                sys.exit(f"prepare_data: --from-dir: no {name}.jsonl or {name}.parquet in {args.from_dir}")
            where, rows = str(found[0]), load_local(found[0])
        else:
            where = f"{hub_id} ({configs or 'default'}, split {split})"
            rows = load_hub(hub_id, configs, split, [prompt, answer] + (["difficulty"] if name == TRAIN else []))
        rows = normalise(name, rows, where)
        write_jsonl(rows, Path(args.out) / out_file)
        print(f"{name}: {len(rows)} rows from {where} ({prompt!r}, {answer!r}) -> {Path(args.out) / out_file}")


if __name__ == "__main__":
    main()
