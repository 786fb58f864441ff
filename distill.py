"""distill.py: the RM-Distiller data pipeline -- preference pairs, answer pools or bare prompts -> training rows.

Takes each row through the five stages of METHOD.md by asking a teacher LLM over the OpenAI chat-completions API:
generate y_T, annotate (both orders), refine y_l into y_w*, self-calibrated score s(y_w*), filter; then restyle
(rmd's style-equivalence pairs, see README), each rewrite checked by the teacher for a change of content. The
prompts and parsers are protocol.py's, the HTTP client and the request cache teacher.py's, the asking (parse, re-ask,
counts) asker.py's. No torch: the command is `python rmd.py distill`, or from Python:

    from distill import DistillConfig, distill
    summary = distill(DistillConfig(data="pairs.jsonl", teacher_url="http://127.0.0.1:8000/v1",
                                    teacher_model="Qwen/Qwen3-8B", disable_thinking=True))

The layers, bottom up: teacher.Client.post sends one HTTP request (retries, backoff, Retry-After); asker.Asker
adds the cache (exactly once), the counts, the parse and the re-asks of a reply that is no answer (--reask); Run's
stages (answers, judge, refine_and_score, restyled_pairs) ask what METHOD.md asks; distill() runs the rows and
writes the outputs.

The stage order pays only for rows that can be kept: annotation first (a tie or a label disagreement drops the
row), then y_T, refine and score. A teacher's refusal to a prompt is its answer y_T (provenance.teacher_refused,
counted, never re-asked); junk (empty, cut, numbers alone, degenerate) is re-sampled.

Outputs in cfg.out, rows in input order: train.jsonl ({id, prompt, chosen: y_w*, rejected: y_l, chosen_score,
rejected_score, teacher_response: y_T, provenance}), annotated.jsonl (the original pair as the teacher labelled it,
for label-distillation baselines; a row dropped by annotation has no teacher_response: none was asked for),
failures.jsonl (one line per row that did not make it: id, line, stage, reason, raw reply, attempts, every reply of
a re-asked stage; `dropped` marks filter decisions as opposed to errors), summary.json (the per-stage table with
request seconds and span, refusals, cost per kept pair, the word edits y_l -> y_w*), cache.jsonl (teacher.Cache: a
killed run re-run with the same command sends no finished request twice and writes the same output; each reply
is kept with its row, stage, order and re-ask number, for auditing), report.html (report.py: the stage table,
position bias, filters, the Δs histogram and the y_l -> y_w* edits as word diffs). --retry-failed runs the same rows again with
more re-asks: the rows that finished come from the cache, only the failed ones send requests; shards (--shard k/n,
each with its own --out) merge by ordering rows on provenance.line.
"""
import json
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from asker import Asker, AskerConfig, RowFailure
from cli import Progress
from files import atomic_file, folder_lock
from formats import canonical, column_keys, load_distill_rows, read_source_rows, write_jsonl
from protocol import (RESTYLE_STYLES, TEMPLATE_VERSION, annotate_prompt, parse_annotation, parse_refinement,
                      parse_restyle, parse_restyle_check, parse_score, prompt_messages, refine_prompt, render_question,
                      restyle_check_prompt, restyle_prompt, score_prompt)
import report
from teacher import FatalError, bounded, token_estimator_name


# ---------------------------------------------------------------------------- config

@dataclass
class DistillConfig(AskerConfig):
    """The teacher pipeline's options: how to ask the teacher (asker.AskerConfig's, listed first in --help)
    and what to ask and keep."""
    data: str = ""                      # input JSONL: {prompt, chosen, rejected} | {prompt, responses: [...]} | {prompt}
    prompt_key: str = ""                # column holding the prompt ("" = prompt; OpenRLHF's --prompt_key)
    chosen_key: str = ""                # column holding the chosen answer ("" = chosen)
    rejected_key: str = ""              # column holding the rejected answer ("" = rejected)
    out: str = "out/distill"            # output dir: train.jsonl, annotated.jsonl, failures.jsonl, summary.json; one run at a time
    gen_temperature: float = 0.7        # y_T and candidate answers
    gen_top_p: float = 0.8              # nucleus sampling for y_T and candidate answers
    gen_max_tokens: int = 1024          # reply length cap for y_T and candidate answers
    annotate_temperature: float = 0.0   # annotate, score and the restyle check (greedy)
    annotate_max_tokens: int = 512      # reply length cap for annotation
    refine_temperature: float = 0.7     # sampling temperature of the refinement
    refine_max_tokens: int = 2048       # reply length cap for the refinement (diagnosis + edited answer)
    score_max_tokens: int = 256         # reply length cap for the self-calibrated score and the restyle check
    min_delta: float = 1.0              # keep a pair only if s(y_w*) - s(y_l) > min_delta
    restyle: bool = True                # rewrite y_w* and y_l in one other style: restyled, crossed, style-equivalence pairs
    restyle_temperature: float = 0.0    # restyle is greedy: a faithful rewrite, not a sample
    restyle_check: bool = True          # ask the teacher whether each rewrite kept the content; drop the pairs of one it says changed (one short request per rewrite)
    original_pairs: bool = True         # train.jsonl also gets each kept row's annotated pair (source "original")
    tie_policy: str = "drop"            # drop | reask (once, asking to avoid equal scores)
    keep_label_disagreements: bool = False  # keep pairs whose input label the teacher contradicts
    limit: int = 0                      # process only the first N rows, 0 = all
    shard: str = ""                     # "k/n": only rows with index % n == k (rows are independent)
    price_prompt: float = 0.0           # USD per 1M prompt tokens, for the cost estimate
    price_completion: float = 0.0       # USD per 1M completion tokens
    progress: bool = True               # progress line on stderr


# ---------------------------------------------------------------------------- the stages

STAGES = ("probe", "candidates", "generate", "annotate", "refine", "score", "restyle", "restyle_check")  # report rows


def _norm(text):
    return " ".join(text.split())


def _sign(x):
    return (x > 0) - (x < 0)


def _mean(scores):
    return {k: (scores["a_first"][k] + scores["b_first"][k]) / 2 for k in "ab"}


class Run:
    """One distill run: what is asked of the teacher for each row (the stages, through an Asker), and the tallies
    of what came of it; `process_row` takes a row through every stage."""

    def __init__(self, cfg):
        self.cfg, self.asker, self.lock, self.fatal = cfg, Asker(cfg, STAGES + ("internal",)), threading.Lock(), None
        self.rows = {"kept": 0, "failed": 0, "dropped": 0}  # rows done so far, for the progress line
        # rows that gave extra pairs, and how many; rows whose rewrites changed nothing; failed rows; rewrites the
        # teacher checked, and those it said changed the content (not used)
        self.restyle = {"rows": 0, "pairs": 0, "unchanged": 0, "failed": 0, "checked": 0, "changed": 0}
        self.bias = {"pairs": 0, "disagreements": 0}

    def generate_body(self, model, row, purpose):
        """A sampled generation of `model`'s answer to the row's prompt (y_T, or a candidate answer)."""
        cfg = self.cfg
        return self.asker.body(model, prompt_messages(row["prompt"]), cfg.gen_temperature, cfg.gen_max_tokens,
                               cfg.gen_top_p, purpose=purpose)

    def answers(self, row):
        """The two candidate answers (a, b) and where they came from."""
        rid, cfg, candidates = row["id"], self.cfg, self.asker.candidates
        if row["kind"] == "pair":
            return row["chosen"], row["rejected"], {"input": "pair"}
        if row["kind"] == "pool":
            i, j = random.Random(f"{cfg.seed}:{rid}").sample(range(len(row["responses"])), 2)
            return row["responses"][i], row["responses"][j], {"input": "pool", "responses": [i, j]}
        if not candidates:
            raise RowFailure("candidates", "no_candidate_models", "bare prompts need --candidate-models")
        picks = [0, 0] if len(candidates) == 1 else \
            random.Random(f"{cfg.seed}:{rid}:candidates").sample(range(len(candidates)), 2)
        texts = [self.asker.ask("candidates", candidates[pick][1],
                                self.generate_body(candidates[pick][0], row, f"{rid}:candidate:{k}"))[0][0]
                 for k, pick in enumerate(picks)]
        return texts[0], texts[1], {"input": "prompt", "candidate_models": [candidates[p][0] for p in picks]}

    def annotate(self, question, a, b, tie_reask=False):
        """Order-wise scores {a_first: {a, b}, b_first: {a, b}} from two greedy annotate calls."""
        cfg, asker, scores = self.cfg, self.asker, {}
        for order, (x, y) in (("a_first", (a, b)), ("b_first", (b, a))):
            text = annotate_prompt(question, x, y, asker.json_mode, tie_reask)
            body = asker.body(cfg.teacher_model, [{"role": "user", "content": text}], cfg.annotate_temperature,
                              cfg.annotate_max_tokens, purpose=f"{order}:{text}", json_mode=asker.json_mode)
            s1, s2 = asker.ask("annotate", asker.teacher, body, parse_annotation, asker.json_mode, (a, b),
                               order=order)[0]
            scores[order] = {"a": s1, "b": s2} if order == "a_first" else {"a": s2, "b": s1}
        return scores

    def judge(self, question, a, b):
        """Annotate both orders (again, asking to avoid a tie, under --tie-policy=reask) -> (scores, mean scores);
        a tie is a dropped row."""
        scores = self.annotate(question, a, b)
        with self.lock:
            self.bias["pairs"] += 1
            o1, o2 = scores["a_first"], scores["b_first"]
            self.bias["disagreements"] += _sign(o1["a"] - o1["b"]) != _sign(o2["a"] - o2["b"])
        mean = _mean(scores)
        if mean["a"] == mean["b"] and self.cfg.tie_policy == "reask":
            scores["tie_reask"] = True
            scores.update(self.annotate(question, a, b, tie_reask=True))
            mean = _mean(scores)
        if mean["a"] == mean["b"]:
            raise RowFailure("annotate", "tie", canonical(scores), dropped=True)
        scores["mean"] = mean
        return scores, mean

    def refine_and_score(self, rid, question, teacher_answer, rejected, rejected_score):
        """Refine y_l towards y_T, then score y_w* in the same conversation, anchored on s(y_l), and filter:
        (diagnosis, y_w*, s(y_w*)), or a dropped row."""
        cfg, asker = self.cfg, self.asker
        nonce, refine_text = refine_prompt(question, teacher_answer, rejected, asker.json_mode)
        messages = [{"role": "user", "content": refine_text}]
        (diagnosis, refined), refine_reply = asker.ask("refine", asker.teacher, asker.body(
            cfg.teacher_model, messages, cfg.refine_temperature, cfg.refine_max_tokens, purpose=f"{rid}:refine",
            json_mode=asker.json_mode), parse_refinement, nonce, asker.json_mode, rejected)
        messages = messages + [{"role": "assistant", "content": refine_reply},
                               {"role": "user", "content": score_prompt(nonce, rejected_score, asker.json_mode)}]
        refined_score = asker.ask("score", asker.teacher, asker.body(
            cfg.teacher_model, messages, cfg.annotate_temperature, cfg.score_max_tokens,
            purpose=f"{rid}:score", json_mode=asker.json_mode), parse_score, asker.json_mode, (rejected, refined))[0]
        if _norm(refined) == _norm(rejected):
            raise RowFailure("filter", "unchanged", refined, dropped=True)
        if not refined_score - rejected_score > cfg.min_delta:
            raise RowFailure("filter", "small_delta", f"{refined_score:g} - {rejected_score:g}", dropped=True)
        return diagnosis, refined, refined_score

    def distill_row(self, row, out):
        """The stages for one row: fills out["annotated"], out["train"] (and out["extra"]), or raises RowFailure.
        Annotation comes first and may drop the row (tie, label disagreement): no generate request is paid for a
        row that cannot be kept."""
        cfg, rid = self.cfg, row["id"]
        question = render_question(row["prompt"])
        a, b, source = self.answers(row)
        scores, mean = self.judge(question, a, b)
        winner, loser = ("a", "b") if mean["a"] > mean["b"] else ("b", "a")
        answer = {"a": a, "b": b}
        provenance = {"teacher_model": cfg.teacher_model, "template_version": TEMPLATE_VERSION,
                      "line": row["line"], "annotate_scores": scores, **source}
        label_agrees = winner == "a" if row["kind"] == "pair" else None
        annotated = {"id": rid, "prompt": row["prompt"], "chosen": answer[winner], "rejected": answer[loser],
                     "chosen_score": mean[winner], "rejected_score": mean[loser]}
        out["annotated"] = {**annotated, "provenance": {**provenance, "source": "annotated",
                                                        "label_agrees": label_agrees}}
        if label_agrees is False and not cfg.keep_label_disagreements:  # its annotated row has no y_T: none was paid
            raise RowFailure("annotate", "label_disagreement", canonical(scores), dropped=True)
        teacher_answer, refused = self.asker.ask("generate", self.asker.teacher,
                                                 self.generate_body(cfg.teacher_model, row, f"{rid}:teacher"))[0]
        if refused:  # the teacher's refusal is its answer y_T: kept, and marked so that it can be found
            provenance["teacher_refused"] = True
        out["annotated"] = {**annotated, "teacher_response": teacher_answer,
                            "provenance": {**provenance, "source": "annotated", "label_agrees": label_agrees}}
        rejected, rejected_score = answer[loser], mean[loser]
        diagnosis, refined, refined_score = self.refine_and_score(rid, question, teacher_answer, rejected,
                                                                  rejected_score)
        out["train"] = {"id": rid, "prompt": row["prompt"], "chosen": refined, "rejected": rejected,
                        "chosen_score": refined_score, "rejected_score": rejected_score,
                        "teacher_response": teacher_answer,
                        "provenance": {**provenance, "diagnosis": diagnosis, "source": "refined"}}
        reasks = self.asker.row_local.reasks
        if reasks:  # stages answered only after a re-ask: their answers may differ from a first reply's
            out["train"]["provenance"]["reasks"] = dict(reasks)
        out["extra"] = self.restyled_pairs(out["train"], question) if cfg.restyle else []
        if cfg.original_pairs:  # the natural pair too: refine had to fix y_l, so its label is about content
            out["extra"].append({**out["annotated"], "id": f"{rid}:original",  # ids stay unique in train.jsonl
                                 "provenance": {**provenance, "source": "original"}})

    def process_row(self, row):
        """One row through every stage -> {train?, annotated?, failure?}; every row gets a train row or a failure."""
        rid, out = row["id"], {}
        self.asker.row_local.reasks, self.asker.row_local.row = {}, rid
        try:
            self.distill_row(row, out)
        except RowFailure as f:
            out["failure"] = {"id": rid, "line": row["line"], "stage": f.stage, "reason": f.reason,
                              "dropped": f.dropped, "attempts": f.attempts, "raw": bounded(f.raw)}
            if f.replies:
                out["failure"]["replies"] = f.replies
        except FatalError as e:
            self.fatal = self.fatal or e
            self.asker.stop.set()
        except Exception as e:  # noqa: BLE001 - a bug or a reply nobody foresaw: record it, keep the run going
            out["failure"] = {"id": rid, "line": row["line"], "stage": "internal", "reason": type(e).__name__,
                              "dropped": False, "attempts": 0, "raw": repr(e)[:2000]}
        self.tally(out)
        return out

    def tally(self, out):
        failure = out.get("failure")
        with self.lock:
            if "train" in out or failure:  # not a row that a FatalError stopped
                self.rows["kept" if "train" in out else "dropped" if failure["dropped"] else "failed"] += 1
        if failure and not failure["dropped"]:
            self.asker.count_failure(failure["stage"], failure["reason"])

    def restyled_pairs(self, refined_row, question):
        """y_w* and y_l rewritten in one style S drawn per row (seeded) -> pairs in which every style sits on both
        sides: (y_w*S, y_lS), and the crossed (y_w*S, y_l) and (y_w*, y_lS), with the refined pair's margin; the
        style-equivalence pairs (y_w*S, y_w*) and (y_lS, y_l) with margin 0. A rewrite that changes nothing only
        removes the pairs it would duplicate; a rewrite the teacher says changed the content (restyle check) is not
        used: the pairs it is in are dropped, the other rewrite's kept, and the refined row's provenance names it. A
        failure costs the row its extra pairs, not its refined pair: it is counted and noted in the provenance."""
        rid, cfg = refined_row["id"], self.cfg
        chosen, rejected = refined_row["chosen"], refined_row["rejected"]
        style = random.Random(f"{cfg.seed}:{rid}:restyle").choice(sorted(RESTYLE_STYLES))
        note = refined_row["provenance"]["restyle"] = {"style": style}
        try:
            chosen_s, rejected_s = (self.restyle_answer(rid, which, question, answer, style)
                                    for which, answer in (("chosen", chosen), ("rejected", rejected)))
            changed = self.changed_rewrites(rid, question, {"chosen": (chosen, chosen_s),
                                                            "rejected": (rejected, rejected_s)})
        except RowFailure as f:
            note["failed"] = f.reason
            with self.lock:
                self.restyle["failed"] += 1
            self.asker.count_failure(f.stage, f.reason)
            return []
        if changed:
            note["changed"] = changed
        high, low = refined_row["chosen_score"], refined_row["rejected_score"]
        candidates = [  # (source, chosen, rejected, their scores, the rewrites the pair is made of)
            ("restyled", chosen_s, rejected_s, high, low, {"chosen", "rejected"}),
            ("crossed", chosen_s, rejected, high, low, {"chosen"}),
            ("crossed", chosen, rejected_s, high, low, {"rejected"}),
            ("equivalent", chosen_s, chosen, high, high, {"chosen"}),
            ("equivalent", rejected_s, rejected, low, low, {"rejected"})]
        seen, pairs = {(_norm(chosen), _norm(rejected))}, []
        provenance = {k: v for k, v in refined_row["provenance"].items() if k != "diagnosis"}
        for source, c, r, sc, sr, rewrites in candidates:
            if rewrites & set(changed) or _norm(c) == _norm(r) or (_norm(c), _norm(r)) in seen:
                continue  # a rewrite that changed the content, or an unchanged one: nothing true or new to learn
            seen.add((_norm(c), _norm(r)))
            pairs.append({"id": f"{rid}:{source}:{len(pairs)}", "prompt": refined_row["prompt"], "chosen": c,
                          "rejected": r, "chosen_score": sc, "rejected_score": sr,
                          "provenance": {**provenance, "source": source}})
        with self.lock:
            if pairs or not changed:  # a row left without pairs by the check counts in "changed" only
                self.restyle["rows" if pairs else "unchanged"] += 1
            self.restyle["pairs"] += len(pairs)
        return pairs

    def changed_rewrites(self, rid, question, rewrites):
        """Which of `rewrites` ({which: (original, rewritten)}) the teacher says changed the content: the restyle
        check, asked once per rewrite that changed anything (an unchanged one gives no pair), none under
        --restyle-check=false."""
        if not self.cfg.restyle_check:
            return []
        changed = []
        for which, (original, rewritten) in rewrites.items():
            if _norm(original) == _norm(rewritten):
                continue
            same = self.check_rewrite(rid, which, question, original, rewritten)
            with self.lock:
                self.restyle["checked"] += 1
                self.restyle["changed"] += not same
            if not same:
                changed.append(which)
        return changed

    def check_rewrite(self, rid, which, question, original, rewritten):
        """The restyle check of one rewrite (greedy, a one-line verdict): True when the teacher says it keeps the
        original's content."""
        cfg, asker = self.cfg, self.asker
        text = restyle_check_prompt(question, original, rewritten, asker.json_mode)
        body = asker.body(cfg.teacher_model, [{"role": "user", "content": text}], cfg.annotate_temperature,
                          cfg.score_max_tokens, purpose=f"{rid}:restyle_check:{which}", json_mode=asker.json_mode)
        return asker.ask("restyle_check", asker.teacher, body, parse_restyle_check, asker.json_mode,
                         (original, rewritten), order=which)[0]

    def restyle_answer(self, rid, which, question, answer, style):
        cfg, asker = self.cfg, self.asker
        nonce, text = restyle_prompt(question, answer, style, asker.json_mode)
        body = asker.body(cfg.teacher_model, [{"role": "user", "content": text}], cfg.restyle_temperature,
                          cfg.refine_max_tokens, purpose=f"{rid}:restyle:{which}", json_mode=asker.json_mode)
        return asker.ask("restyle", asker.teacher, body, parse_restyle, nonce, asker.json_mode, answer, order=which)[0]


# ---------------------------------------------------------------------------- the report

def summarize(run, outputs, wall_s):
    """summary.json: the per-stage table (requests, cache hits, re-asks, refusals, tokens, request seconds, span,
    cost), the row outcomes, and what the teacher cost per kept pair."""
    cfg, stages = run.cfg, {}
    for name, st in run.asker.stats.items():
        if not (st["sent"] or st["cache_hits"] or st["failures"]):
            continue
        cost = (st["prompt_tokens"] * cfg.price_prompt + st["completion_tokens"] * cfg.price_completion) / 1e6
        stages[name] = {k: st[k] for k in ("sent", "replies", "cache_hits", "reasks", "recovered", "refusals",
                                           "failures", "prompt_tokens", "completion_tokens")}
        stages[name]["request_s"] = round(st["request_s"], 3)  # summed over requests: they overlap in time
        stages[name]["span_s"] = round((st["last"] or 0) - (st["first"] or 0), 3)  # first to last: spans overlap
        stages[name]["cost_usd"] = round(cost, 6)
    n = run.bias["pairs"]
    counts = row_counts(outputs)
    return {"teacher_url": cfg.teacher_url, "teacher_model": cfg.teacher_model,
            "template_version": TEMPLATE_VERSION, "json_mode": run.asker.json_mode, **counts,
            "refusals": {"generate": run.asker.stats["generate"]["refusals"],
                         "candidates": run.asker.stats["candidates"]["refusals"],
                         "kept_rows": sum(t["provenance"].get("teacher_refused", False) for t in outputs["train"]
                                          if t["provenance"]["source"] == "refined")},
            "restyle": dict(run.restyle),
            "position_bias": {**run.bias, "rate": round(run.bias["disagreements"] / n, 4) if n else None},
            "stages": stages, "wall_s": round(wall_s, 3),
            "cost_usd": round(sum(s["cost_usd"] for s in stages.values()), 6),
            "per_kept_pair": per_kept_pair(stages, counts["kept"], cfg.price_prompt or cfg.price_completion),
            "edits": report.edit_stats([(t["rejected"], t["chosen"]) for t in outputs["train"]
                                        if t["provenance"]["source"] == "refined"]),
            "config": asdict(cfg)}


def per_kept_pair(stages, kept, priced):
    """What this run paid the teacher (requests sent, tokens, dollars when priced) per kept refined pair; None
    when nothing was kept. Requests answered from the cache cost nothing and count nothing."""
    if not kept:
        return None
    total = {k: sum(st[k] for st in stages.values()) for k in ("sent", "prompt_tokens", "completion_tokens")}
    out = {"requests": round(total["sent"] / kept, 2), "prompt_tokens": round(total["prompt_tokens"] / kept, 1),
           "completion_tokens": round(total["completion_tokens"] / kept, 1)}
    if priced:
        out["cost_usd"] = round(sum(st["cost_usd"] for st in stages.values()) / kept, 6)
    return out


def row_counts(outputs):
    """{rows, kept, dropped: {reason: n}, failed} of train/failures outputs. A failed restyle costs a row its extra
    pairs only: the row is kept."""
    kept = sum(t["provenance"]["source"] == "refined" for t in outputs["train"])  # rows, not extra pairs
    dropped = {}
    for f in outputs["failures"]:
        if f["dropped"]:
            dropped[f["reason"]] = dropped.get(f["reason"], 0) + 1
    return {"rows": kept + len(outputs["failures"]), "kept": kept, "dropped": dict(sorted(dropped.items())),
            "failed": sum(not f["dropped"] for f in outputs["failures"])}


def progress_text(run, t0):
    """The progress line's text after cli.Progress's rows done/total, elapsed and ETA."""
    stats, rows = run.asker.stats, run.rows
    sent = sum(st["sent"] for st in stats.values())
    hits = sum(st["cache_hits"] for st in stats.values())
    rate = sent / max(time.time() - t0, 1e-9)
    return (f"kept {rows['kept']}  failed {rows['failed']}  dropped {rows['dropped']} | requests sent {sent}  "
            f"cached {hits}  in flight {run.asker.in_flight()} | {rate:.1f} req/s")


def _show_progress(run, total, done):
    """Rows done of `total` with elapsed time and ETA (cli.Progress: a bar on a terminal, a line every 10 s in a
    log) until `done` is set, then the final line."""
    progress = Progress(total, "distill")
    while not done.wait(0.5):
        progress.update(sum(run.rows.values()), progress_text(run, progress.t0))
    progress.update(sum(run.rows.values()), progress_text(run, progress.t0), final=True)


def print_report(summary, file=None):
    file = file or sys.stderr
    cells = [report.STAGE_HEADERS] + [[str(c) for c in row] for row in report.stage_rows(summary)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(report.STAGE_HEADERS))]
    for row in cells:  # numbers right-aligned; the stage and the failures by reason left-aligned
        print("  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip(), file=file)
    print(f"position bias: {report.bias_text(summary['position_bias'])}", file=file)
    print(f"refusals: {report.refusal_text(summary)}", file=file)
    print(f"minimality: {report.edit_text(summary.get('edits'))}", file=file)
    timeouts = sum(st["failures"].get("timeout", 0) for st in summary["stages"].values())
    if timeouts:
        print(f"timeouts: {timeouts} requests got no reply within --timeout={summary['config']['timeout']:g}s (retried "
              "once each): a slow teacher needs a larger --timeout, smaller --*-max-tokens, or fewer --workers "
              "(failures.jsonl says how long its tokens take)", file=file)
    rs = summary.get("restyle")
    if rs and any(rs.values()):
        print(f"restyle: {report.restyle_text(rs)}", file=file)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary["dropped"].items())) or "none"
    print(f"rows: {summary['rows']} in, {summary['kept']} kept, dropped: {dropped}, failed: {summary['failed']} | "
          f"wall {summary['wall_s']:.1f}s, est. cost ${summary['cost_usd']:.4f}", file=file)
    print(f"teacher cost: {report.cost_text(summary)}", file=file)


# ---------------------------------------------------------------------------- outputs and --retry-failed

def _outputs(results):
    """{file name: rows} of the results, in input order (a kept row's extra restyle pairs after it)."""
    return {"train": [t for r in results if "train" in r for t in (r["train"], *r.get("extra", []))],
            "annotated": [r["annotated"] for r in results if "annotated" in r],
            "failures": [r["failure"] for r in results if "failure" in r]}


def _failed_before(cfg):
    """The ids of the rows that an earlier run in cfg.out failed (not the dropped ones), for --retry-failed.
    Every row runs again: what finished comes from the cache, so only those rows send requests."""
    failures, cache = os.path.join(cfg.out, "failures.jsonl"), cfg.cache or os.path.join(cfg.out, "cache.jsonl")
    for path in (failures, cache):
        if not os.path.exists(path):
            raise ValueError(f"--retry-failed: {path} does not exist; run distill without --retry-failed first "
                             "(the same command, with the same --out)")
    return {f["id"] for _, f in read_source_rows(failures) if not f["dropped"]}


def _check_config(cfg):
    problems = [name for name, ok in (
        ("teacher_url is empty: give --teacher-url (OpenAI-compatible base URL)", cfg.teacher_url),
        ("teacher_model is empty: give --teacher-model", cfg.teacher_model),
        ("data is empty: give --data (a JSONL file)", cfg.data),
        ("json_mode must be auto, on or off", cfg.json_mode in ("auto", "on", "off")),
        ("tie_policy must be drop or reask", cfg.tie_policy in ("drop", "reask")),
        ("max_tokens_param must be auto, max_tokens or max_completion_tokens",
         cfg.max_tokens_param in ("auto", "max_tokens", "max_completion_tokens")),
        ("workers must be >= 1", cfg.workers >= 1),
        ("shard must look like k/n with 0 <= k < n", not cfg.shard or re.fullmatch(r"\d+/\d+", cfg.shard)
         and int(cfg.shard.split("/")[0]) < int(cfg.shard.split("/")[1])),
    ) if not ok]
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------- the run

def _say_start(cfg, run, rows):
    key_note = "set" if os.environ.get(cfg.api_key_env) else "not set (fine for local servers)"
    print(f"[distill] {len(rows)} rows from {cfg.data} -> {cfg.out} | teacher {cfg.teacher_model} at "
          f"{run.asker.teacher.url} (${cfg.api_key_env} {key_note})\n[distill] limits: workers {cfg.workers}, "
          f"rpm {cfg.rpm or 'unlimited'}, tpm {cfg.tpm or 'unlimited'}, timeout {cfg.timeout}s, "
          f"retries {cfg.max_retries} (backoff {cfg.backoff_base}s..{cfg.backoff_max}s), "
          f"token estimates: {token_estimator_name()}, cache {run.asker.cache.path} "
          f"({len(run.asker.cache)} entries)", file=sys.stderr)
    keyless = sorted({client.url for _, client in run.asker.candidates if not client.api_key})
    if keyless and not cfg.candidate_api_key_env:
        print(f"[distill] candidate URL(s) {', '.join(keyless)} get no API key (the teacher's goes to the teacher's "
              "URL only): pass --candidate-api-key-env=VAR to send one", file=sys.stderr)


def _run_rows(run, rows):
    """Every row through process_row, 2 x workers rows at a time -> results in input order. A FatalError or a
    Ctrl-C stops the run; the cache keeps what finished."""
    cfg = run.cfg
    try:
        run.asker.json_mode = run.asker.probe_json_mode()
        print(f"[distill] annotate/score replies: {'JSON mode' if run.asker.json_mode else 'anchored text'}",
              file=sys.stderr)
        done = threading.Event()
        shower = threading.Thread(target=_show_progress, args=(run, len(rows), done), daemon=True)
        if cfg.progress:
            shower.start()
        pool = ThreadPoolExecutor(2 * cfg.workers)  # more rows than request slots keeps every slot busy
        try:
            results = list(pool.map(run.process_row, rows))
        except BaseException:  # Ctrl-C: rows stop at their next request; the cache keeps what finished
            run.asker.stop.set()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            done.set()
            if cfg.progress:
                shower.join()  # its final line before the report
        if run.fatal:
            raise run.fatal
    finally:
        run.asker.cache.close()
    return results


def distill(cfg):
    """Run the whole pipeline for `cfg` (a DistillConfig); write the outputs to cfg.out; return the summary. One run
    at a time per cfg.out: another process's run there is a files.FolderBusy (a ValueError) naming its PID."""
    _check_config(cfg)
    rows = load_distill_rows(cfg.data, cfg.limit, cfg.shard, column_keys(cfg))
    with folder_lock(cfg.out, "distill"):  # two runs on one folder would send every request twice
        return _distill_rows(cfg, rows)


def _distill_rows(cfg, rows):
    retried = _failed_before(cfg) if cfg.retry_failed else None
    if retried is not None:
        print(f"[distill] --retry-failed: the {len(retried)} failed row(s) of {cfg.out}/failures.jsonl again, with "
              f"{cfg.reask + 1} more re-asks each; the other rows come from the cache", file=sys.stderr)
    run, t0 = Run(cfg), time.time()
    _say_start(cfg, run, rows)
    results = _run_rows(run, rows)
    outputs = _outputs(results)
    summary = summarize(run, outputs, time.time() - t0)
    summary["original_pairs"] = sum(t["provenance"]["source"] == "original" for t in outputs["train"])
    if retried is not None:
        summary["retry_failed"] = {"rows": len(retried), "recovered": sum(t["id"] in retried for t in outputs["train"]
                                                                          if t["provenance"]["source"] == "refined")}
    for name, items in outputs.items():
        write_jsonl(os.path.join(cfg.out, name + ".jsonl"), items)
    with atomic_file(os.path.join(cfg.out, "summary.json")) as f:
        json.dump(summary, f, indent=2)
    print_report(summary)
    report.distill_report(cfg.out, summary, outputs["train"])  # <out>/report.html: the run in pictures
    return summary
