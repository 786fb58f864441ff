"""Use a trained reward model: benchmark accuracy, best-of-N ranking, and an HTTP reward server for RL trainers.

    python rmd.py eval  --model DIR --data FILE [--out results.json] [--batch-size 32] [--padding-side right]
    python rmd.py bon   --model DIR --data rows.jsonl [--out scored.jsonl]
    python rmd.py serve --model DIR [--host 127.0.0.1] [--port 5000]
    python rmd.py COMMAND --help                # every option, its type, default and meaning

`eval` reads local JSONL (or one JSON array) in one of three public formats, detected from the first row:
  - pairs:       {prompt, chosen, rejected}                       -> accuracy (strict >, a tie is wrong); with
                 chosen_score/rejected_score or margin also the margin fit (Pearson r and MSE of Δr against Δs)
  - RewardBench: {prompt, chosen, rejected, subset}               -> per-subset accuracy, the four leaderboard
                 sections (subsets weighted by allenai/reward-bench's EXAMPLE_COUNTS) and their mean
  - RM-Bench:    {prompt, chosen: [3], rejected: [3], domain}     -> easy / normal / hard per domain and overall
It prints a table and writes the numbers as JSON (default: under out/eval/, never next to the input). `bon` writes
the scored rows under out/bon/; rows with a `true_quality` list also get the picks scored against it. Every reward
is read at the last real token of a sequence tokenized and cut exactly as in training (rmd.render_prompt /
render_answer + eos, rmd.fit: the prompt's end is always kept, then the answer's beginning); the cuts are counted in
the results. Sequences are sorted by length before batching, so little padding is computed, and results do not
depend on --batch-size or --padding-side.

`serve` answers POST /get_reward (also / and /score) with either
  - OpenRLHF's remote reward-model form: {"query": [full texts], "prompts": [...]?, "labels": [...]?}
    -> {"rewards": [...], "scores": [...], "extra_logs": {...}}. Each query is already formatted text (rendered
    prompt + response); it is tokenized as it is, trailing pad/eos text stripped and one eos id appended, as
    OpenRLHF's own serve_rm does. `prompts` and `labels` are accepted and not needed.
  - the plain form: {"prompt": p, "response": r} or {"prompts": [...], "responses": [...]} -> {"rewards": [...]};
    prompts are strings or message lists and are rendered as in training.
Concurrent requests are micro-batched by one worker thread that owns the model. GET /health says it is up.

In Python: `evaluate.sequence_rewards(model, sequences)`, `evaluate.pair_rewards(model, prompts, answers)`,
`evaluate.evaluate_file(model, path)`, `evaluate.best_of_n(model, rows)`, `evaluate.start_server(model)`.
"""
from __future__ import annotations

import json
import os
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import rmd
from cli import parse_overrides
from formats import DataError, answer_of, as_messages, detect_format, parse_row, read_rows

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


@dataclass
class EvalConfig:
    model: str = ""  # a folder written by `rmd.py train` (its model/ subfolder)
    data: str = ""  # pairs, RewardBench rows or RM-Bench rows: .jsonl, .jsonl.gz, a .json array or .parquet
    out: str = ""  # results JSON (default: out/eval/<data file name>.json)
    format: str = "auto"  # auto, pairs, rewardbench, rmbench
    batch_size: int = 32  # sequences per forward pass
    padding_side: str = "right"  # right or left: the results do not depend on it
    max_len: int = 0  # tokens per sequence (0 = the model's training max_len)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...


# ----------------------------------------------------------------------------------------------------------------
# rewards, batched


def pair_tokens(model, prompt, answer, max_len, cuts=None):
    """(prompt, answer) -> token ids exactly as training builds and cuts them (rmd.RewardModel.tokens); the cut is
    counted in cuts (an rmd.CutCounts) when given."""
    return model.tokens(prompt, answer, max_len, cuts)


def text_tokens(model, text, max_len):
    """An already formatted full text (prompt + response) -> ids + eos; trailing pad/eos text is dropped first."""
    tok = model.tokenizer
    if not isinstance(tok, rmd.ByteTokenizer):
        for special in (tok.pad_token, tok.eos_token):
            while special and text.endswith(special):
                text = text[:-len(special)]
    ids = rmd.encode(tok, text)[-(max_len - 1):] + [tok.eos_token_id]
    return ids


def sequence_rewards(model, sequences, batch_size=32, padding_side="right"):
    """Rewards of token-id sequences, sorted by length and padded per batch (rmd.RewardModel.sequence_rewards)."""
    return model.sequence_rewards(sequences, batch_size, padding_side)


def pair_rewards(model, prompts, answers, batch_size=32, padding_side="right", max_len=0, cuts=None):
    max_len = max_len or model.max_len
    sequences = [pair_tokens(model, p, a, max_len, cuts) for p, a in zip(prompts, answers, strict=True)]
    return sequence_rewards(model, sequences, batch_size, padding_side)


# ----------------------------------------------------------------------------------------------------------------
# benchmarks


def accuracy_of(chosen, rejected):
    return sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(chosen))


def evaluate_pairs(model, rows, fmt, batch_size, padding_side, max_len):
    """pairs / RewardBench rows -> metrics dict. Each row's prompt and answers are parsed as in training."""
    prompts, chosen, rejected, subsets, margins = [], [], [], [], []
    for where, row in rows:
        for key in ("prompt", "chosen", "rejected") if fmt == "rewardbench" else ("chosen", "rejected"):
            if key not in row:
                raise DataError(f"{where}: missing field '{key}'")
        messages, c, r, margin, _ = parse_row(row, where, False)
        prompts.append(messages), chosen.append(c), rejected.append(r), margins.append(margin)
        subsets.append(str(row.get("subset", "")))
    cuts = rmd.CutCounts()
    rewards = pair_rewards(model, prompts + prompts, chosen + rejected, batch_size, padding_side, max_len, cuts=cuts)
    r_chosen, r_rejected = rewards[:len(prompts)], rewards[len(prompts):]
    result = {"format": fmt, "pairs": len(prompts), "accuracy": accuracy_of(r_chosen, r_rejected),
              "ties": sum(c == r for c, r in zip(r_chosen, r_rejected)), **cut_report(cuts, max_len)}
    if all(m is not None for m in margins):  # pairs with chosen_score/rejected_score or margin
        result["margin_fit"] = rmd.margin_fit([c - r for c, r in zip(r_chosen, r_rejected)], margins)
    if fmt == "rewardbench":
        per_subset = {}
        for name in sorted(set(subsets)):
            idx = [i for i, s in enumerate(subsets) if s == name]
            per_subset[name] = {"accuracy": accuracy_of([r_chosen[i] for i in idx], [r_rejected[i] for i in idx]),
                                "n": len(idx)}
        result["subsets"] = per_subset
        result["sections"] = reward_bench_sections({k: v["accuracy"] for k, v in per_subset.items()})
        result["score"] = sum(result["sections"].values()) / len(result["sections"]) if result["sections"] else None
        result["unweighted_subsets"] = sorted(set(per_subset) - set(EXAMPLE_COUNTS))  # e.g. prior sets: not scored
    return result, r_chosen, r_rejected


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
    cuts = rmd.CutCounts()
    rewards = pair_rewards(model, prompts, answers, batch_size, padding_side, max_len, cuts=cuts)
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
    """The cut counts of the scored sequences (rmd.fit's rule, as in training) and the warning, for the results."""
    return {"max_len": max_len, "cuts": {"reward": vars(cuts).copy()},
            "warnings": rmd.cut_warnings("eval", {"reward": cuts}, max_len)}


def evaluate_file(model, path, fmt="auto", batch_size=32, padding_side="right", max_len=0):
    """Benchmark file -> (metrics dict, per-item rewards: pairs give (chosen, rejected) lists, RM-Bench a flat list)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    max_len = max_len or getattr(model, "max_len", 0)
    if fmt == "auto":
        fmt = detect_format(rows[0][1], rows[0][0])
    if fmt == "rmbench":
        for where, row in rows:
            detect_format(row, where)
        return evaluate_rm_bench(model, rows, batch_size, padding_side, max_len)
    result, chosen, rejected = evaluate_pairs(model, rows, fmt, batch_size, padding_side, max_len)
    return result, (chosen, rejected)


def table(result):
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
        lines.append(rmd.fit_text(result["margin_fit"]))
    return "\n".join(lines + cut_lines(result))


def cut_lines(result):
    if "cuts" not in result:
        return []
    counts = rmd.CutCounts(**result["cuts"]["reward"])
    return [f"cut to --max-len={result['max_len']}: {counts.summary('sequences')}", *result["warnings"]]


def pick_device(device):
    rmd.check_device(device)
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(command, cfg):
    """The --model folder of eval/bon/serve, or a one-line error saying what to pass."""
    if not cfg.model:
        raise SystemExit(f"error: rmd.py {command} needs --model=DIR: the model/ folder `rmd.py train` wrote "
                         "(e.g. out/train/model)")
    device = pick_device(cfg.device)
    if not os.path.exists(os.path.join(cfg.model, "rmd.json")):
        inner = os.path.join(cfg.model, "model")
        hint = f"; did you mean --model={inner}?" if os.path.exists(os.path.join(inner, "rmd.json")) else \
            ": give the model/ folder `rmd.py train` wrote (e.g. out/train/model)"
        what = "no such folder" if not os.path.exists(cfg.model) else "not an rmd reward-model folder (no rmd.json)"
        raise SystemExit(f"error: --model={cfg.model}: {what}{hint}")
    try:
        return rmd.load_reward_model(cfg.model, device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model={cfg.model} could not be loaded: {str(e).splitlines()[0]}") from None


def default_out(command, data, suffix):
    """Where eval/bon write when --out is not given: under out/<command>/, never next to the input."""
    return os.path.join("out", command, os.path.basename(data).split(".")[0] + suffix)


def eval_command(argv):
    cfg = parse_overrides(EvalConfig(), argv, "python rmd.py eval", "Accuracy of a trained reward model on pairs, "
                          "RewardBench or RM-Bench rows.")
    if cfg.padding_side not in ("left", "right") or cfg.format not in ("auto", "pairs", "rewardbench", "rmbench"):
        raise SystemExit("error: --padding-side is left or right; --format is auto, pairs, rewardbench or rmbench")
    if not cfg.data:
        raise SystemExit("error: rmd.py eval needs --data=FILE (pairs, RewardBench or RM-Bench rows)")
    rmd.check_data_file("data", cfg.data)
    model = load_model("eval", cfg)
    try:
        result, _ = evaluate_file(model, cfg.data, cfg.format, cfg.batch_size, cfg.padding_side, cfg.max_len)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    result = {"model": cfg.model, "data": cfg.data, **result}
    print(table(result))
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
        raise SystemExit(f"error: cannot write --out={path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# best-of-N


def best_of_n(model, rows, batch_size=32, max_len=0, cuts=None):
    """[{prompt, responses: [...]}] -> the same rows with rewards, best (first highest index), best_response and
    cuts (how many of the row's responses were cut to max_len, by rmd.fit's kind; {} when none). The cuts of all
    rows are added to cuts (an rmd.CutCounts) when given."""
    max_len = max_len or model.max_len
    sequences, row_cuts = [], []
    for where, row in rows:
        responses = row.get("responses")
        if "prompt" not in row or not isinstance(responses, list) or not responses:
            raise DataError(f"{where}: best-of-N rows need 'prompt' and a non-empty list 'responses'")
        messages, mine = as_messages(row["prompt"], where), rmd.CutCounts()
        for response in responses:
            sequences.append(pair_tokens(model, messages, answer_of(response, "responses", where), max_len, mine))
        row_cuts.append(mine)
    rewards = sequence_rewards(model, sequences, batch_size)
    out, k = [], 0
    for (_, row), mine_cuts in zip(rows, row_cuts):
        mine = rewards[k:k + len(row["responses"])]
        k += len(mine)
        best = max(range(len(mine)), key=lambda i: (mine[i], -i))
        cut = {kind: getattr(mine_cuts, kind) for kind in rmd.CUT_KINDS if getattr(mine_cuts, kind)}
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
        raise SystemExit("error: rmd.py bon needs --data=rows.jsonl ({prompt, responses: [...]})")
    rmd.check_data_file("data", cfg.data)
    model = load_model("bon", cfg)
    cuts = rmd.CutCounts()
    try:
        rows = read_rows(cfg.data)
        scored = best_of_n(model, rows, cfg.batch_size, cfg.max_len, cuts)
        quality = pick_quality(rows, scored)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
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


# ----------------------------------------------------------------------------------------------------------------
# reward server


class BadRequest(ValueError):
    def __init__(self, reason, status=400):
        super().__init__(reason)
        self.status = status


def request_sequences(model, body, max_items, max_len):
    """A parsed JSON request -> (token sequences, OpenRLHF form?). Raises BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")

    def strings(key):
        value = body[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"'{key}' must be a list of strings")
        return value

    def check_count(n):
        if n == 0:
            raise BadRequest("nothing to score: the list is empty")
        if n > max_items:
            raise BadRequest(f"{n} items in one request; at most {max_items}", 413)

    if "query" in body:
        queries = strings("query")
        check_count(len(queries))
        return [text_tokens(model, q, max_len) for q in queries], True
    if "response" in body and "prompt" in body:
        prompts, responses = [body["prompt"]], [body["response"]]
    elif "responses" in body and "prompts" in body:
        prompts, responses = body["prompts"], body["responses"]
        if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
            raise BadRequest("'prompts' and 'responses' must be lists of the same length")
    else:
        raise BadRequest("expected {\"query\": [texts]} (OpenRLHF), {\"prompt\", \"response\"} or "
                         "{\"prompts\": [...], \"responses\": [...]}")
    check_count(len(prompts))
    sequences = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(r, str):
            raise BadRequest(f"response {i} must be a string")
        try:
            sequences.append(pair_tokens(model, p, r, max_len))
        except DataError as e:
            raise BadRequest(f"prompt {i}: {str(e).split(': ', 1)[-1]}") from None
    return sequences, False


class Scorer:
    """One worker thread owns the model; requests queue up and are scored together (micro-batching)."""

    def __init__(self, model, batch_size=32, max_batch_items=512):
        self.model, self.batch_size, self.max_batch_items = model, batch_size, max_batch_items
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()

    def score(self, sequences):
        job = {"sequences": sequences, "done": threading.Event()}
        self.jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["rewards"]

    def work(self):
        while True:
            jobs = [self.jobs.get()]
            if jobs[0] is None:
                return
            total = len(jobs[0]["sequences"])
            while total < self.max_batch_items:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                jobs.append(job)
                total += len(job["sequences"])
            try:
                rewards = sequence_rewards(self.model, [s for j in jobs for s in j["sequences"]], self.batch_size)
                k = 0
                for job in jobs:
                    job["rewards"] = rewards[k:k + len(job["sequences"])]
                    k += len(job["sequences"])
            except Exception as e:  # noqa: BLE001 - reported to every waiting request as a 500
                for job in jobs:
                    job["error"] = e
            for job in jobs:
                job["done"].set()

    def close(self):
        self.jobs.put(None)


def start_server(model, host="127.0.0.1", port=0, batch_size=32, max_items=256, max_body=8 << 20, max_len=0,
                 idle_timeout=30.0, max_connections=64):
    """Serve in a background thread -> (url, shutdown function). A connection silent for idle_timeout seconds
    is closed, a request body must arrive within idle_timeout per read and 4 x idle_timeout in all, and at most
    max_connections are served at once (more get a 503 and are closed)."""
    scorer = Scorer(model, batch_size)
    max_len = max_len or model.max_len

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = idle_timeout  # socket timeout for every read: a half-sent request cannot hold a thread for good

        def reply(self, status, payload, headers=()):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):
            """The standard library's HTML error pages (bad request line, unknown method...) as JSON."""
            self.close_connection = True
            if code == 501:  # a method nobody implements here
                return self.not_allowed()
            self.reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

        def not_allowed(self):
            self.close_connection = True  # a body may follow, unread
            self.reply(405, {"error": f"method {self.command} not allowed; POST /get_reward or /score, GET /health"},
                       headers=[("Allow", "GET, POST")])

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = not_allowed

        def do_GET(self):
            if self.path.split("?")[0] == "/health":
                return self.reply(200, {"status": "ok"})
            if self.path.split("?")[0] in ("/", "/get_reward", "/score"):
                return self.reply(405, {"error": f"{self.path} takes POST with a JSON body"})
            self.reply(404, {"error": f"unknown path {self.path}; POST /get_reward, GET /health"})

        def do_POST(self):
            try:
                self.post()
            except (socket.timeout, ConnectionError):
                self.close_connection = True  # the client stalled or left: nobody to answer
            except Exception as e:  # noqa: BLE001 - answer every request, never just drop the connection
                self.close_connection = True
                self.reply(500, {"error": f"internal error: {type(e).__name__}"})

        def body_length(self):
            """The declared body length, or an error reply (then the body is never read)."""
            if self.headers.get("Transfer-Encoding"):
                return None, (411, "chunked bodies are not accepted; send a Content-Length header")
            value = self.headers.get("Content-Length")
            if value is None:
                return None, (411, "a Content-Length header is required")
            if not re.fullmatch(r"[0-9]{1,15}", value.strip()):
                return None, (400, f"invalid Content-Length {value[:40]!r}")
            length = int(value)
            if length > max_body:
                return None, (413, f"request body of {length} bytes; at most {max_body}")
            return length, None

        def read_body(self, length):
            """Exactly `length` bytes, under an overall deadline (a client may drip them)."""
            deadline, chunks, left = time.monotonic() + 4 * idle_timeout, [], length
            while left:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                chunks.append(chunk)
                left -= len(chunk)
                if time.monotonic() > deadline:
                    raise socket.timeout("request body too slow")
            return b"".join(chunks)

        def post(self):
            length, problem = self.body_length()
            if problem:
                self.close_connection = True  # the unread body would be taken for the next request
                return self.reply(problem[0], {"error": problem[1]})
            if self.path.split("?")[0] not in ("/", "/get_reward", "/score"):
                self.read_body(length)
                return self.reply(404, {"error": f"unknown path {self.path}; POST /get_reward or /score"})
            try:
                body = json.loads(self.read_body(length))
                json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") fail here
            except (ValueError, UnicodeError) as e:
                return self.reply(400, {"error": f"request body is not valid JSON text: {str(e)[:200]}"})
            except RecursionError:
                return self.reply(400, {"error": "request body is nested too deeply"})
            try:
                sequences, openrlhf = request_sequences(model, body, max_items, max_len)
            except BadRequest as e:
                return self.reply(e.status, {"error": str(e)})
            try:
                rewards = scorer.score(sequences)
            except Exception as e:  # noqa: BLE001
                return self.reply(500, {"error": f"scoring failed: {type(e).__name__}: {e}"})
            if openrlhf:
                return self.reply(200, {"rewards": rewards, "scores": rewards, "extra_logs": {"reward": rewards}})
            self.reply(200, {"rewards": rewards})

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request, client_address):
            if not self.slots.acquire(blocking=False):  # over the bound: answer at once, without a thread
                try:
                    request.settimeout(1.0)
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 40\r\nConnection: close\r\n\r\n"
                                    b'{"error": "too many connections, retry"}')
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address):
            pass  # a client that vanished mid-request

    server = Server((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def shutdown():
        server.shutdown()
        server.server_close()
        scorer.close()

    return f"http://{server.server_address[0]}:{server.server_address[1]}", shutdown


@dataclass
class ServeConfig:
    model: str = ""  # a folder written by `rmd.py train` (its model/ subfolder)
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines
    port: int = 5000  # TCP port
    batch_size: int = 32  # sequences per forward pass
    max_items: int = 256  # sequences per request (more: 413)
    max_body_mb: float = 8.0  # request body size limit in MiB (more: 413)
    max_len: int = 0  # tokens per sequence (0 = the model's training max_len)
    idle_timeout: float = 30.0  # seconds a connection may stay silent (mid-request or between requests)
    max_connections: int = 64  # connections served at once; more get 503
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...


def serve_command(argv):
    cfg = parse_overrides(ServeConfig(), argv, "python rmd.py serve", "HTTP reward server: POST /get_reward "
                          "(OpenRLHF --remote_rm_url) or /score; GET /health.")
    model = load_model("serve", cfg)
    try:
        url, shutdown = start_server(model, cfg.host, cfg.port, cfg.batch_size, cfg.max_items,
                                     int(cfg.max_body_mb * (1 << 20)), cfg.max_len, cfg.idle_timeout,
                                     cfg.max_connections)
    except OSError as e:
        raise SystemExit(f"error: cannot serve on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    print(f"reward server at {url}/get_reward (OpenRLHF --remote_rm_url) and {url}/score", file=sys.stderr)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shutdown()
