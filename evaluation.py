"""evaluation.py -- use a trained reward model on files: benchmark accuracy (eval) and best-of-N ranking (bon).

    python rmd.py eval  --model DIR --data FILE [--out results.json] [--batch-size 32] [--padding-side right]
    python rmd.py bon   --model DIR --data rows.jsonl [--out scored.jsonl]
    python rmd.py COMMAND --help                # every option, its type, default and meaning

`eval` reads local JSONL (or one JSON array) in one of three public formats, detected from the first row:
  - pairs:       {prompt, chosen, rejected}                       -> accuracy (strict >, a tie is wrong); with
                 chosen_score/rejected_score or margin also the margin fit (Pearson r and MSE of Δr against Δs)
  - RewardBench: {prompt, chosen, rejected, subset}               -> per-subset accuracy, the four leaderboard
                 sections (subsets weighted by allenai/reward-bench's EXAMPLE_COUNTS) and their mean
  - RM-Bench:    {prompt, chosen: [3], rejected: [3], domain}     -> easy / normal / hard per domain and overall
It prints a table and writes the numbers as JSON (default: under out/eval/, never next to the input). `bon` writes
the scored rows under out/bon/; rows with a `true_quality` list also get the picks scored against it. Every reward
is read at the last real token of a sequence tokenized and cut exactly as in training (model.render_prompt /
render_answer + eos, model.fit: the prompt's end is always kept, then the answer's beginning); the cuts are counted
in the results. Pairs and RewardBench files are tokenized once into --token-cache (pair_cache.py: the cache train
maps) and scored EVAL_BLOCK pairs at a time, so memory does not grow with the file (RM-Bench's few thousand rows are
read whole). Answers to the same prompt share one copy of it where that costs less (RewardModel.piece_rewards);
sequences are sorted by length before batching, so little padding is computed, and results do not depend on
--batch-size or --padding-side. The HTTP reward server is serve.py.

In Python: `evaluation.evaluate_file(model, path)`, `evaluation.best_of_n(model, rows)`, with a model from
`model.load_reward_model(path)` (whose .score(prompts, answers) gives the rewards).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

import pair_cache
from batches import check_data_file, count_cuts, cut_warnings
from cli import parse_overrides
from formats import (DataError, UsageError, answer_of, as_messages, column_keys, detect_format, read_located_rows,
                     read_source_rows)
from model import CUT_KINDS, CutCounts, load_reward_model, pick_device


# allenai/reward-bench rewardbench/constants.py: the leaderboard weights each subset by these counts inside its
# section (math-prm is up-weighted to equal the code subsets together); the overall score is the sections' mean.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SUBSET_MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
RM_BENCH_DOMAINS = ("chat", "math", "code", "safety")  # styles in each row: concise, detailed, detailed+markdown
EVAL_BLOCK = 4096  # pairs scored per model.piece_rewards call: memory stays bounded, the results do not depend on it


@dataclass
class EvalConfig:
    model: str = ""  # a folder written by `rmd.py train` (its model/ subfolder)
    data: str = ""  # pairs, RewardBench rows or RM-Bench rows: .jsonl, .jsonl.gz, a .json array, .parquet, hf:owner/name
    prompt_key: str = ""  # column holding the prompt ("" = prompt; OpenRLHF's --prompt_key)
    chosen_key: str = ""  # column holding the chosen answer(s) ("" = chosen)
    rejected_key: str = ""  # column holding the rejected answer(s) ("" = rejected)
    out: str = ""  # results JSON (default: out/eval/<data file name>.json)
    format: str = "auto"  # auto, pairs, rewardbench, rmbench
    batch_size: int = 32  # sequences per forward pass
    padding_side: str = "right"  # right or left: the results do not depend on it
    max_len: int = 0  # tokens per sequence (0 = the model's training max_len)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    # pairs and RewardBench files: tokenize once into this folder and map it, as train does (pair_cache.py: keyed by
    # the file's contents, the tokenizer, --max-len and the cutting rule), so memory does not grow with the file;
    # "off" = tokenize in memory every run
    token_cache: str = "out/token_cache"


# ----------------------------------------------------------------------------------------------------------------
# benchmarks


def margin_fit(reward_margins, teacher_margins):
    """How well the student's Δr = r(chosen) − r(rejected) follows the teacher's Δs on held-out pairs: the Pearson
    correlation (None when either side is constant) and the mean squared error of Δr − Δs (what --loss=mse
    minimises; on another scale under the bt losses, where only the correlation compares)."""
    r, s = np.asarray(reward_margins, dtype=np.float64), np.asarray(teacher_margins, dtype=np.float64)
    if r.shape != s.shape:
        raise ValueError(f"margin_fit: {len(r)} reward margins but {len(s)} teacher margins")
    dr, ds = r - r.mean(), s - s.mean()
    var_r, var_s = float(dr @ dr), float(ds @ ds)
    pearson = float(dr @ ds) / math.sqrt(var_r * var_s) if var_r > 0 and var_s > 0 else None
    return {"pairs": len(r), "pearson": pearson, "mse": float(np.mean((r - s) ** 2))}


def fit_text(fit):
    pearson = "n/a (constant)" if fit["pearson"] is None else f"{fit['pearson']:.3f}"
    return f"margin fit: pearson {pearson}, mse {fit['mse']:.4f}"


def accuracy_of(chosen, rejected):
    """Share of pairs with r(chosen) > r(rejected) (arrays; a tie is wrong)."""
    return float(np.mean(chosen > rejected)) if len(chosen) else 0.0


def evaluate_pairs(model, path, fmt, batch_size, padding_side, max_len, keys=None, cache_dir=None):
    """pairs / RewardBench rows -> (metrics dict, r(chosen), r(rejected) as arrays). The rows are read, tokenized
    and cut as in training (pair_cache.load: into cache_dir once and mapped, or in memory when None) and scored
    EVAL_BLOCK pairs at a time, so memory does not grow with the file."""
    store, _ = pair_cache.load([path], model.tokenizer, max_len, cache_dir, keys, keep_dropped=True)
    subsets = reward_bench_subsets(path, keys) if fmt == "rewardbench" else None
    r_chosen, r_rejected = pair_rewards(model, store, batch_size, padding_side)
    margins = store.column("margin")
    result = {"format": fmt, "pairs": len(store), "accuracy": accuracy_of(r_chosen, r_rejected),
              "ties": int((r_chosen == r_rejected).sum()), **cut_report(count_cuts(store, False)["reward"], max_len)}
    if not np.isnan(margins).any():  # pairs with chosen_score/rejected_score or margin
        result["margin_fit"] = margin_fit(r_chosen - r_rejected, margins)
    if fmt == "rewardbench":
        per_subset = {}
        for name in sorted(set(subsets)):
            idx = np.array(subsets) == name
            per_subset[name] = {"accuracy": accuracy_of(r_chosen[idx], r_rejected[idx]), "n": int(idx.sum())}
        result["subsets"] = per_subset
        result["sections"] = reward_bench_sections({k: v["accuracy"] for k, v in per_subset.items()})
        result["score"] = sum(result["sections"].values()) / len(result["sections"]) if result["sections"] else None
        result["unweighted_subsets"] = sorted(set(per_subset) - set(EXAMPLE_COUNTS))  # e.g. prior sets: not scored
    return result, r_chosen, r_rejected


def pair_rewards(model, store, batch_size, padding_side):
    """r(chosen) and r(rejected) of every row of a pair_cache.PairStore, as float arrays, EVAL_BLOCK rows per
    model.piece_rewards call (a row's two answers share its prompt where that costs less). A row whose two sequences
    are the same (pair_cache.DROPS) gets one reward for both: a tie, whatever the float noise of its batches."""
    chosen, rejected = np.zeros(len(store)), np.zeros(len(store))
    for start in range(0, len(store), EVAL_BLOCK):
        block = list(store[start:start + EVAL_BLOCK])
        pieces = [(ex.prompt[0], ex.chosen) for ex in block] + [(ex.prompt[1], ex.rejected) for ex in block]
        rewards = model.piece_rewards(pieces, batch_size, padding_side)
        span = slice(start, start + len(block))
        chosen[span], rejected[span] = rewards[:len(block)], rewards[len(block):]
    same = store.column("drop") != 0
    rejected[same] = chosen[same]
    return chosen, rejected


def reward_bench_subsets(path, keys):
    """Each RewardBench row's subset, in file order (the token cache keeps none); a row without a prompt field is
    refused (every RewardBench row has one)."""
    subsets = []
    try:
        for line, row in read_source_rows(path, keys):
            if "prompt" not in row:
                raise DataError(f"{path}:{line}: missing field 'prompt'")
            subsets.append(str(row.get("subset", "")))
    except ValueError as e:
        raise DataError(str(e)) from None
    return subsets


def reward_bench_sections(subset_accuracy):
    """The leaderboard's section scores: example-count-weighted mean of the subsets present (sections with none
    present are left out, and then the mean is not the leaderboard's overall score)."""
    sections = {}
    for section, names in SUBSET_MAPPING.items():
        present = [n for n in names if n in subset_accuracy]
        if present:
            sections[section] = (sum(subset_accuracy[n] * EXAMPLE_COUNTS[n] for n in present)
                                 / sum(EXAMPLE_COUNTS[n] for n in present))
    return sections


def evaluate_rm_bench(model, rows, batch_size, padding_side, max_len):
    """RM-Bench: per prompt M[i][j] = r(chosen style i) > r(rejected style j), styles concise, detailed, markdown.
    hard = mean over i < j (plainer chosen vs fancier rejected), normal = diagonal, easy = i > j."""
    prompts, answers, domains = [], [], []
    for where, row in rows:
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(f"{where}: missing field '{key}'")
        messages = as_messages(row["prompt"], where)
        for answer in row["chosen"] + row["rejected"]:
            prompts.append(messages), answers.append(answer_of(answer, "chosen/rejected", where))
        domain = str(row.get("domain") or str(row.get("id", "")).split("/")[0] or "all")
        domains.append(domain.split("-")[0].lower())  # safety-refuse, safety-response -> safety
    cuts = CutCounts()
    rewards = model.score(prompts, answers, batch_size, max_len, padding_side, cuts)
    cells = {"hard": [(i, j) for i in range(3) for j in range(3) if i < j], "normal": [(i, i) for i in range(3)],
             "easy": [(i, j) for i in range(3) for j in range(3) if i > j]}
    per_row = []
    for k in range(len(domains)):
        r = rewards[6 * k:6 * k + 6]
        per_row.append({level: sum(r[i] > r[3 + j] for i, j in ij) / len(ij) for level, ij in cells.items()})
    per_domain = {}
    for domain in sorted(set(domains)):
        idx = [k for k, d in enumerate(domains) if d == domain]
        scores = {level: sum(per_row[k][level] for k in idx) / len(idx) for level in cells}
        scores["average"] = sum(scores.values()) / 3
        per_domain[domain] = {**scores, "n": len(idx)}
    overall = {level: sum(d[level] for d in per_domain.values()) / len(per_domain)
               for level in ("easy", "normal", "hard", "average")}
    return {"format": "rmbench", "prompts": len(domains), "domains": per_domain, "overall": overall,
            **cut_report(cuts, max_len)}, rewards


def cut_report(cuts, max_len):
    """The cut counts of the scored sequences (model.fit's rule, as in training) and the warning, for the results."""
    return {"max_len": max_len, "cuts": {"reward": vars(cuts).copy()},
            "warnings": cut_warnings("eval", {"reward": cuts}, max_len)}


def evaluate_file(model, path, fmt="auto", batch_size=32, padding_side="right", max_len=0, keys=None, cache_dir=None):
    """Benchmark file -> (metrics dict, per-item rewards: pairs give (chosen, rejected) arrays, RM-Bench a flat list).
    cache_dir: pairs and RewardBench rows are tokenized once into it and mapped (pair_cache.py); None: in memory."""
    where, first = first_row(path, keys)
    max_len = max_len or getattr(model, "max_len", 0)
    if fmt == "auto":
        fmt = detect_format(first, where)
    if fmt == "rmbench":
        rows = read_located_rows(path, keys)
        for where, row in rows:
            detect_format(row, where)
        return evaluate_rm_bench(model, rows, batch_size, padding_side, max_len)
    result, chosen, rejected = evaluate_pairs(model, path, fmt, batch_size, padding_side, max_len, keys, cache_dir)
    return result, (chosen, rejected)


def first_row(path, keys):
    """(file:line, row) of a data file's first row; DataError when it has none."""
    try:
        for line, row in read_source_rows(path, keys):
            return f"{path}:{line}", row
    except ValueError as e:
        raise DataError(str(e)) from None
    raise DataError(f"{path}: no rows")


def results_table(result):
    """The metrics as a small text table (percent)."""
    pct = lambda x: f"{100 * x:6.2f}"  # noqa: E731
    lines = []
    if result["format"] == "rmbench":
        lines.append(f"{'domain':<10} {'n':>5} {'easy':>6} {'normal':>6} {'hard':>6} {'avg':>6}")
        for name, d in list(result["domains"].items()) + [("overall", {**result["overall"], "n": result["prompts"]})]:
            lines.append(f"{name:<10} {d['n']:>5} {pct(d['easy'])} {pct(d['normal'])} {pct(d['hard'])} "
                         f"{pct(d['average'])}")
        return "\n".join(lines + cut_lines(result))
    if result["format"] == "rewardbench":
        lines.append(f"{'subset':<24} {'n':>5} {'acc':>6}")
        for name, s in result["subsets"].items():
            lines.append(f"{name:<24} {s['n']:>5} {pct(s['accuracy'])}")
        lines.append("")
        for name, score in result["sections"].items():
            lines.append(f"{name:<24} {'':>5} {pct(score)}")
        if result["score"] is not None:
            lines.append(f"{'RewardBench (mean)':<24} {'':>5} {pct(result['score'])}"
                         + ("" if len(result["sections"]) == 4 else "  (not all 4 sections present)"))
    lines.append(f"{'all pairs':<24} {result['pairs']:>5} {pct(result['accuracy'])}  ({result['ties']} ties)")
    if "margin_fit" in result:
        lines.append(fit_text(result["margin_fit"]))
    return "\n".join(lines + cut_lines(result))


def cut_lines(result):
    if "cuts" not in result:
        return []
    counts = CutCounts(**result["cuts"]["reward"])
    return [f"cut to --max-len={result['max_len']}: {counts.summary('sequences')}", *result["warnings"]]


def load_model(command, cfg):
    """The --model folder of eval/bon/serve, or a one-line error saying what to pass."""
    if not cfg.model:
        raise UsageError(f"rmd.py {command} needs --model=DIR: the model/ folder `rmd.py train` wrote "
                         "(e.g. out/train/model)")
    device = pick_device(cfg.device)
    if not os.path.exists(os.path.join(cfg.model, "rmd.json")):
        inner = os.path.join(cfg.model, "model")
        hint = f"; did you mean --model={inner}?" if os.path.exists(os.path.join(inner, "rmd.json")) else \
            ": give the model/ folder `rmd.py train` wrote (e.g. out/train/model)"
        what = "no such folder" if not os.path.exists(cfg.model) else "not an rmd reward-model folder (no rmd.json)"
        raise UsageError(f"--model={cfg.model}: {what}{hint}")
    try:
        return load_reward_model(cfg.model, device)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model={cfg.model} could not be loaded: {str(e).splitlines()[0]}") from None


def default_out(command, data, suffix):
    """Where eval/bon write when --out is not given: under out/<command>/, never next to the input."""
    if data.startswith("hf:"):  # hf:owner/name:split -> owner_name_split
        return os.path.join("out", command, re.sub(r"[^\w.-]+", "_", data[3:]).strip("_") + suffix)
    return os.path.join("out", command, os.path.basename(data).split(".")[0] + suffix)


def eval_command(argv):
    cfg = parse_overrides(EvalConfig(), argv, "python rmd.py eval", "Accuracy of a trained reward model on pairs, "
                          "RewardBench or RM-Bench rows.")
    if cfg.padding_side not in ("left", "right") or cfg.format not in ("auto", "pairs", "rewardbench", "rmbench"):
        raise UsageError("--padding-side is left or right; --format is auto, pairs, rewardbench or rmbench")
    if not cfg.data:
        raise UsageError("rmd.py eval needs --data=FILE (pairs, RewardBench or RM-Bench rows)")
    check_data_file("data", cfg.data)
    model = load_model("eval", cfg)
    result, _ = evaluate_file(model, cfg.data, cfg.format, cfg.batch_size, cfg.padding_side, cfg.max_len,
                              column_keys(cfg), None if cfg.token_cache == "off" else cfg.token_cache)
    result = {"model": cfg.model, "data": cfg.data, **result}
    print(results_table(result))
    out = cfg.out or default_out("eval", cfg.data, ".json")
    write_file(out, json.dumps(result, indent=2) + "\n")
    print(f"results: {out}", file=sys.stderr)
    return result


def write_file(path, text):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"cannot write --out={path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# best-of-N


def best_of_n(model, rows, batch_size=32, max_len=0, cuts=None):
    """[{prompt, responses: [...]}] -> the same rows with rewards, best (first highest index), best_response and
    cuts (how many of the row's responses were cut to max_len, by model.fit's kind; {} when none). The cuts of all
    rows are added to cuts (an CutCounts) when given."""
    max_len = max_len or model.max_len
    sequences, row_cuts = [], []
    for where, row in rows:
        responses = row.get("responses")
        if "prompt" not in row or not isinstance(responses, list) or not responses:
            raise DataError(f"{where}: best-of-N rows need 'prompt' and a non-empty list 'responses'")
        messages, mine = as_messages(row["prompt"], where), CutCounts()
        for response in responses:
            sequences.append(model.pieces(messages, answer_of(response, "responses", where), max_len, mine))
        row_cuts.append(mine)
    rewards = model.piece_rewards(sequences, batch_size)  # a row's answers share its prompt where that pays
    out, k = [], 0
    for (_, row), mine_cuts in zip(rows, row_cuts):
        mine = rewards[k:k + len(row["responses"])]
        k += len(mine)
        best = max(range(len(mine)), key=lambda i: (mine[i], -i))
        cut = {kind: getattr(mine_cuts, kind) for kind in CUT_KINDS if getattr(mine_cuts, kind)}
        out.append({**row, "rewards": mine, "best": best, "best_response": row["responses"][best], "cuts": cut})
        if cuts is not None:
            for name, value in vars(mine_cuts).items():
                setattr(cuts, name, getattr(cuts, name) + value)
    return out


@dataclass
class BonConfig:
    model: str = ""  # a folder written by `rmd.py train` (its model/ subfolder)
    data: str = ""  # rows {prompt, responses: [...]} (+ true_quality: [...] to score the picks)
    out: str = ""  # scored rows (default: out/bon/<data file name>.scored.jsonl; the summary beside it)
    batch_size: int = 32  # sequences per forward pass
    max_len: int = 0  # tokens per sequence (0 = the model's training max_len)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...


def bon_command(argv):
    cfg = parse_overrides(BonConfig(), argv, "python rmd.py bon", "Best-of-N: every response's reward and the "
                          "pick; with a true_quality field, how good the picks are.")
    if not cfg.data:
        raise UsageError("rmd.py bon needs --data=rows.jsonl ({prompt, responses: [...]})")
    check_data_file("data", cfg.data)
    rows = read_located_rows(cfg.data)
    if not rows:  # nothing scored is no result: a script that checks the exit code must hear of it
        raise DataError(f"{cfg.data} has no rows (the file is empty or blank); best-of-N needs rows "
                        "{prompt, responses: [...]}")
    model = load_model("bon", cfg)
    cuts = CutCounts()
    scored = best_of_n(model, rows, cfg.batch_size, cfg.max_len, cuts)
    quality = pick_quality(rows, scored)
    out = cfg.out or default_out("bon", cfg.data, ".scored.jsonl")
    write_file(out, "".join(json.dumps(row) + "\n" for row in scored))
    print(f"{len(scored)} rows, {sum(len(r['rewards']) for r in scored)} responses scored: {out}", file=sys.stderr)
    print("\n".join(cut_lines(cut_report(cuts, cfg.max_len or model.max_len))), file=sys.stderr)
    if quality:
        summary = out.rsplit(".jsonl", 1)[0] + ".summary.json"
        write_file(summary, json.dumps({"model": cfg.model, "data": cfg.data, **quality}, indent=2) + "\n")
        print(quality_table(quality))
        print(f"summary: {summary}", file=sys.stderr)
    return scored


def pick_quality(rows, scored):
    """Rows carrying true_quality (one number per response): the mean true quality of the reward model's picks and
    the share of correct picks (quality 1.0), beside a random pick's (expected) and the oracle's. {} without it."""
    rated = []
    for (where, row), out in zip(rows, scored):
        quality = row.get("true_quality")
        if quality is None:
            continue
        if not isinstance(quality, list) or len(quality) != len(row["responses"]) or not all(
                isinstance(q, (int, float)) and not isinstance(q, bool) for q in quality):
            raise DataError(f"{where}: 'true_quality' must be a list of numbers, one per response")
        rated.append((quality, out["best"]))
    if not rated:
        return {}
    n = len(rated)
    mean = lambda xs: sum(xs) / n  # noqa: E731
    return {"rows": n, "rows_without_true_quality": len(rows) - n,
            "picked": {"mean_quality": mean([q[b] for q, b in rated]),
                       "correct": mean([q[b] == 1.0 for q, b in rated])},
            "random": {"mean_quality": mean([sum(q) / len(q) for q, _ in rated]),
                       "correct": mean([sum(x == 1.0 for x in q) / len(q) for q, _ in rated])},
            "oracle": {"mean_quality": mean([max(q) for q, _ in rated]),
                       "correct": mean([max(q) == 1.0 for q, _ in rated])}}


def quality_table(quality):
    lines = [f"best-of-N on {quality['rows']} rows with true_quality (correct = quality 1.0)",
             f"{'pick':<16} {'mean quality':>12} {'correct':>8}"]
    for name, label in (("picked", "reward model"), ("random", "random pick"), ("oracle", "oracle pick")):
        lines.append(f"{label:<16} {quality[name]['mean_quality']:>12.3f} {100 * quality[name]['correct']:>7.1f}%")
    return "\n".join(lines)
