"""Self-contained HTML reports of a run (inline SVG, no script, no network), standard library only.

    import report
    report.train_report("out/train")            # -> out/train/report.html, from what `rmd.py train` wrote there
    report.distill_report("out/distill", summary, train_rows)   # -> out/distill/report.html (distill.distill)

The train page: loss parts (pair, LM, total), pair accuracy, learning rate and evaluation accuracy over the steps
(log.jsonl, eval_log.jsonl, eval.json), and each eval split's chosen vs rejected rewards as overlaid histograms
(eval_rewards.json, written at the final evaluation). The distill page: the per-stage table, the position-bias rate,
the filter counts, the histogram of the teacher margins Δs of the refined pairs, and a sample of refined pairs
with the edit from y_l to y_w* as a word-level diff (<del>/<ins>): the method made visible.

stage_rows is also the table that distill.py prints at the end of a run. Standard library only: the teacher side
(distill.py) imports this file and must not reach torch; `train --report-to` (tensorboard, wandb) is in train.py.
`python report.py OUT_DIR` rebuilds a train run's page.
"""
from __future__ import annotations

import difflib
import html
import json
import math
import os
import re
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
CHOSEN, REJECTED = "#2ca02c", "#d62728"
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:1em}svg{background:#fff;border:1px solid #ddd}.note{color:#666}
.pair{border:1px solid #ddd;padding:.6em;margin:.8em 0}.diff{white-space:pre-wrap;font-family:monospace}
del{background:#fdd;color:#900}ins{background:#dfd;color:#060;text-decoration:none}"""


# ---------------------------------------------------------------------------------------------- building blocks

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A number as a short label."""
    if value is None:
        return "n/a"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"


def span(values):
    """(low, high) of finite values, widened when flat; (0, 1) when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        low, high = low - (abs(low) * 0.1 or 0.5), high + (abs(high) * 0.1 or 0.5)
    return low, high


def svg_frame(title, width, height, x_range, y_range, body, xlabel=""):
    """An <svg> with a title, a plot area, the min/max of each axis as labels and the x axis' name."""
    (x0, x1), (y0, y1) = x_range, y_range
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
            f'<title>{esc(title)}</title>'
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>'
            f'<rect x="50" y="24" width="{width - 60}" height="{height - 54}" fill="none" stroke="#999"/>'
            f'<text x="46" y="32" text-anchor="end" font-size="10">{esc(fmt(y1))}</text>'
            f'<text x="46" y="{height - 30}" text-anchor="end" font-size="10">{esc(fmt(y0))}</text>'
            f'<text x="50" y="{height - 16}" font-size="10">{esc(fmt(x0))}</text>'
            f'<text x="{width - 10}" y="{height - 16}" text-anchor="end" font-size="10">{esc(fmt(x1))}</text>'
            f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="10">{esc(xlabel)}</text>'
            + body + "</svg>")


def scaler(lo, hi, a, b):
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def legend(names, width, colors):
    items = "".join(f'<rect x="{60 + 110 * i}" y="30" width="10" height="10" fill="{colors[i % len(colors)]}"/>'
                    f'<text x="{74 + 110 * i}" y="39" font-size="10">{esc(name)}</text>'
                    for i, name in enumerate(names))
    return items


def line_chart(title, series, width=560, height=240):
    """series: {name: [(x, y), ...]} -> an SVG line chart (points marked, so one point still shows)."""
    points = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    xs = [x for v in points.values() for x, _ in v]
    (x0, x1), (y0, y1) = span(xs), span([y for v in points.values() for _, y in v])
    sx, sy = scaler(x0, x1, 50, width - 10), scaler(y0, y1, height - 30, 24)
    body = []
    for i, (name, pts) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if len(pts) <= 60:
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                     f'<title>{esc(name)} step {esc(fmt(x))}: {esc(fmt(y))}</title></circle>' for x, y in pts]
    body.append(legend(list(points), width, COLORS))
    return svg_frame(title, width, height, (x0, x1), (y0, y1), "".join(body), "step")


def histogram(title, groups, colors=COLORS, bins=20, width=560, height=240, mark=None, xlabel="reward", step=None):
    """groups: {name: [values]} -> overlaid histograms on shared bins; mark: an x to draw as a dashed line. `step`:
    the values are multiples of it (Δs of scores on a half-point grid): one bin per value, centred on it and
    labelled with it, so that a bar of zeros reads "0", not a range beside it."""
    values = [v for vs in groups.values() for v in vs]
    if step:
        grid = [round(v / step) for v in values + ([mark] if mark is not None else [])] or [0]
        x0, x1 = (min(grid) - 0.5) * step, (max(grid) + 0.5) * step
        bins = max(grid) - min(grid) + 1
    else:
        x0, x1 = span(values + ([mark] if mark is not None else []))
    edges = [x0 + (x1 - x0) * k / bins for k in range(bins + 1)]
    counts = {name: [0] * bins for name in groups}
    for name, vs in groups.items():
        for v in vs:
            counts[name][min(bins - 1, int((v - x0) / (x1 - x0) * bins))] += 1
    top = max([c for cs in counts.values() for c in cs] + [1])
    sx, sy = scaler(x0, x1, 50, width - 10), scaler(0, top, height - 30, 24)
    body = []
    for i, (name, cs) in enumerate(counts.items()):
        color = colors[i % len(colors)]
        body += [f'<rect x="{sx(edges[k]):.1f}" y="{sy(c):.1f}" width="{sx(edges[k + 1]) - sx(edges[k]):.1f}" '
                 f'height="{sy(0) - sy(c):.1f}" fill="{color}" fill-opacity="0.45" stroke="{color}">'
                 f'<title>{esc(name)} {esc(bin_label(edges[k], edges[k + 1], step))}: {c}</title></rect>'
                 for k, c in enumerate(cs) if c]
    if step:  # each bar's value under it
        body += [f'<text x="{sx((edges[k] + edges[k + 1]) / 2):.1f}" y="{height - 32}" text-anchor="middle" '
                 f'font-size="9">{esc(fmt(round((edges[k] + edges[k + 1]) / 2, 6)))}</text>'
                 for k in range(bins) if any(cs[k] for cs in counts.values())]
    if mark is not None:
        body.append(f'<line x1="{sx(mark):.1f}" x2="{sx(mark):.1f}" y1="24" y2="{height - 30}" stroke="#555" '
                    f'stroke-dasharray="4 3"/>')
    body.append(legend([f"{n} ({len(vs)})" for n, vs in groups.items()], width, colors))
    return svg_frame(title, width, height, (x0, x1), (0, top), "".join(body), xlabel)


def bin_label(low, high, step=None):
    """A bin's label: its value when the bins are centred on a grid of `step`, else [low, high)."""
    if step:
        return f"= {fmt(round((low + high) / 2, 6))}"
    return f"[{fmt(low)}, {fmt(high)})"


def html_table(headers, rows):
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c) if isinstance(c, (int, float)) else c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def note(text):
    return f'<p class="note">{esc(text)}</p>'


def page(title, sections):
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>" + "".join(sections) + "</body></html>\n")


def write_page(path, title, sections):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page(title, sections))
        f.flush()
        os.fsync(f.fileno())  # before the rename: after a power cut the page is the old one or the new one
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def read_jsonl(path):
    """Records of a JSONL file; a missing file is none, a torn last line (a killed run) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def word_diff(old, new):
    """HTML of the word-level edit from old to new: removed words in <del>, added ones in <ins>, all escaped."""
    a, b = re.split(r"(\s+)", old), re.split(r"(\s+)", new)
    out = []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(esc("".join(a[i0:i1])))
            continue
        if i1 > i0:
            out.append(f"<del>{esc(''.join(a[i0:i1]))}</del>")
        if j1 > j0:
            out.append(f"<ins>{esc(''.join(b[j0:j1]))}</ins>")
    return "".join(out)


def word_edits(old, new):
    """Word edits that turn old into new: words removed, added and replaced (a replacement of k words by m counts
    max(k, m)), on difflib's alignment -- an upper bound of the word-level Levenshtein distance that, unlike a share
    of old's words changed, counts added text too."""
    a, b = old.split(), new.split()
    edits = 0
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op != "equal":
            edits += max(i1 - i0, j1 - j0)
    return edits


def edit_ratio(old, new):
    """word_edits(old, new) per word of old: 0 = unchanged; 1 = as many edits as old has words (a rewrite, or
    an answer that grew to twice its length)."""
    return word_edits(old, new) / max(1, len(old.split()))


def edit_stats(pairs):
    """{pairs, median, mean, over_1} of the edit ratios of (y_l, y_w*) pairs: how minimal the refinements were;
    None without pairs."""
    ratios = sorted(edit_ratio(old, new) for old, new in pairs)
    if not ratios:
        return None
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return {"pairs": n, "median": round(median, 3), "mean": round(sum(ratios) / n, 3),
            "over_1": sum(x > 1 for x in ratios)}


# ---------------------------------------------------------------------------------------------- train report

def append_eval(out, step, accuracy):
    """One evaluation during training -> <out>/eval_log.jsonl (the accuracy-over-steps chart); the final one is in
    eval.json. A resumed run may log a step twice: the report keeps each step's last record."""
    with open(os.path.join(out, "eval_log.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "accuracy": accuracy}) + "\n")


def save_eval_rewards(out, rewards):
    """{split: [(chosen reward, rejected reward), ...]} of the final evaluation -> <out>/eval_rewards.json."""
    compact = {name: {"chosen": [round(c, 5) for c, _ in pairs], "rejected": [round(r, 5) for _, r in pairs]}
               for name, pairs in rewards.items()}
    with open(os.path.join(out, "eval_rewards.json"), "w", encoding="utf-8") as f:
        json.dump(compact, f)


def last_per_step(records):
    """Records by step, the last one of each step wins (a resumed run may repeat a step), in step order."""
    return sorted({r["step"]: r for r in records if "step" in r}.values(), key=lambda r: r["step"])


def train_charts(log, lm_weight):
    if not log:
        return [note("No training step was logged (--max-steps=0, or the run stopped before its first log line).")]
    steps = [r["step"] for r in log]
    total = [r["pair_loss"] + lm_weight * r["lm_loss"] for r in log]
    losses = {"pair loss": list(zip(steps, [r["pair_loss"] for r in log]))}
    if lm_weight > 0:
        losses["LM loss"] = list(zip(steps, [r["lm_loss"] for r in log]))
        losses[f"total (pair + {fmt(lm_weight)} LM)"] = list(zip(steps, total))
    return [line_chart("loss", losses),
            line_chart("pair accuracy (training batches)", {"accuracy": list(zip(steps, [r["accuracy"] for r in log]))}),
            line_chart("learning rate", {"lr": list(zip(steps, [r["lr"] for r in log]))})]


def eval_chart(evals, final):
    points = {}
    for record in evals + ([{"step": final["step"], "accuracy": final["accuracy"]}] if final else []):
        for split, acc in record["accuracy"].items():
            points.setdefault(split, {})[record["step"]] = acc
    if not points:
        return note("No evaluation split (no --eval-data, no --holdout): no evaluation accuracy to draw.")
    return line_chart("evaluation accuracy", {k: sorted(v.items()) for k, v in points.items()})


def reward_charts(rewards):
    if not rewards:
        return [note("No per-pair rewards (no eval split, or the run has not finished).")]
    return [histogram(f"rewards on {split}: chosen vs rejected", {"chosen": r["chosen"], "rejected": r["rejected"]},
                      colors=[CHOSEN, REJECTED]) for split, r in rewards.items()]


def final_table(final):
    if not final or not final.get("accuracy"):
        return ""
    fits = final.get("margin_fit") or {}
    rows = [(split, final.get("eval_pairs", {}).get(split, ""), acc, (fits.get(split) or {}).get("pearson"),
             (fits.get(split) or {}).get("mse")) for split, acc in final["accuracy"].items()]
    return (f"<h2>Final evaluation (step {esc(final['step'])})</h2>" +
            html_table(["split", "pairs", "accuracy", "margin fit: pearson", "margin fit: mse"], rows))


def train_report(out):
    """<out>/report.html from what `rmd.py train` wrote in out; returns its path."""
    config = read_json(os.path.join(out, "config.json")) or {}
    log = last_per_step(r for r in read_jsonl(os.path.join(out, "log.jsonl")) if "pair_loss" in r)
    evals = last_per_step(read_jsonl(os.path.join(out, "eval_log.jsonl")))
    final = read_json(os.path.join(out, "eval.json"))
    rewards = read_json(os.path.join(out, "eval_rewards.json")) or {}
    head = html_table(["model", "data", "loss", "lm weight", "steps logged", "last step"],
                 [(config.get("model", "?"), config.get("data", "?"), config.get("loss", "?"),
                   config.get("lm_weight", "?"), len(log), log[-1]["step"] if log else 0)])
    sections = [head, "<h2>Training</h2>", '<div class="charts">', *train_charts(log, config.get("lm_weight", 0.0)),
                eval_chart(evals, final), "</div>", final_table(final),
                "<h2>Rewards of the eval splits (final model)</h2>", '<div class="charts">', *reward_charts(rewards),
                "</div>"]
    return write_page(os.path.join(out, "report.html"), f"rmd train: {out}", sections)


# ---------------------------------------------------------------------------------------------- distill report

STAGE_HEADERS = ("stage", "sent", "cached", "re-asks", "recovered", "refusals", "prompt tokens", "completion tokens",
                 "request s", "span s", "cost $", "failures")
STAGE_NOTE = ("sent: HTTP requests sent (retries included); cached: answered from the cache; refusals: replies "
              "that decline (at generate they are the teacher's answer y_T, kept); request s: the seconds its "
              "requests took, summed (requests run in parallel: the sum exceeds the wall time); span s: first to last "
              "request of the stage (the rows' stages interleave: spans overlap).")


def stage_rows(summary):
    """One row per distill stage (columns STAGE_HEADERS): the table distill.print_report prints and the page shows."""
    rows = []
    for name, st in summary.get("stages", {}).items():
        failures = ", ".join(f"{k} {v}" for k, v in sorted(st.get("failures", {}).items())) or "-"
        rows.append((name, st.get("sent", 0), st.get("cache_hits", 0), st.get("reasks", 0), st.get("recovered", 0),
                     st.get("refusals", 0), st.get("prompt_tokens", 0), st.get("completion_tokens", 0),
                     f"{st.get('request_s', 0.0):.1f}", f"{st.get('span_s', st.get('wall_s', 0.0)):.1f}",
                     f"{st.get('cost_usd', 0.0):.4f}", failures))
    return rows


def stage_table(summary):
    return html_table(STAGE_HEADERS, stage_rows(summary)) + note(STAGE_NOTE)


def bias_text(bias):
    """The position-bias line: how often the two presentation orders disagree, and what that says."""
    pairs, rate = bias.get("pairs", 0), bias.get("rate")
    if not pairs:
        return "0/0 pairs: no row got both annotate replies (every row failed or was dropped before that)"
    return (f"{bias.get('disagreements', 0)}/{pairs} pairs ({100 * rate:.1f}%): the share of pairs whose winner "
            "flips when the two answers swap places; 0% is a judge of the answers, ~50% or more a judge at chance or "
            "one that prefers a position")


def refusal_text(summary):
    refusals = summary.get("refusals") or {}
    return (f"{refusals.get('generate', 0)} teacher answers y_T refuse (kept as the answer, never re-asked; "
            f"{refusals.get('kept_rows', 0)} in kept rows); {refusals.get('candidates', 0)} candidate answers refuse")


def cost_text(summary):
    """What the teacher cost per kept refined pair, or why there is no such number."""
    per = summary.get("per_kept_pair")
    if not per:
        return "no pair kept: no cost per kept pair"
    dollars = f", ${per['cost_usd']:.5f}" if "cost_usd" in per else ""
    return (f"{per['requests']:g} requests, {per['prompt_tokens']:g} prompt + {per['completion_tokens']:g} "
            f"completion tokens{dollars} per kept pair (this run's requests; cached ones cost nothing)")


def edit_text(edits):
    if not edits:
        return "no refined pair"
    return (f"median {edits['median']:.2f}, mean {edits['mean']:.2f} word edits per word of y_l "
            f"({edits['over_1']} of {edits['pairs']} pairs over 1: more edits than y_l has words)")


def filter_table(summary):
    bias = summary.get("position_bias") or {}
    rows = [("rows in", summary.get("rows", 0)), ("refined pairs kept", summary.get("kept", 0)),
            ("rows failed (after re-asks)", summary.get("failed", 0))]
    rows += [(f"dropped: {k}", v) for k, v in sorted((summary.get("dropped") or {}).items())]
    rows.append(("position bias: orders disagree", bias_text(bias)))
    rows.append(("refusals", refusal_text(summary)))
    rows.append(("teacher cost", cost_text(summary)))
    rows.append(("minimality of y_l -> y_w* (word edits, added words counted)", edit_text(summary.get("edits"))))
    restyle = summary.get("restyle") or {}
    if any(restyle.values()):
        rows += [("restyle: rows", restyle.get("rows", 0)), ("restyle: extra pairs", restyle.get("pairs", 0)),
                 ("restyle: unchanged", restyle.get("unchanged", 0)), ("restyle: failed", restyle.get("failed", 0)),
                 ("restyle check: rewrites checked", restyle.get("checked", 0)),
                 ("restyle check: content changed (not used)", restyle.get("changed", 0))]
    return html_table(["count", "value"], rows)


def restyle_text(restyle):
    """The restyle line of the printed report: the extra pairs, and what the restyle check kept out."""
    text = (f"{restyle.get('rows', 0)} rows gave {restyle.get('pairs', 0)} restyled, crossed and style-equivalence "
            f"pairs; {restyle.get('unchanged', 0)} rows' rewrites changed nothing, {restyle.get('failed', 0)} failed "
            "(their refined pairs are kept)")
    if restyle.get("checked"):
        text += (f"; the teacher says {restyle.get('changed', 0)} of {restyle['checked']} checked rewrites changed the "
                 "content: their pairs are not used")
    return text


def prompt_text(prompt):
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def pair_view(row):
    diagnosis = (row.get("provenance") or {}).get("diagnosis")
    old, new = str(row.get("rejected", "")), str(row.get("chosen", ""))
    return (f'<div class="pair"><b>{esc(row.get("id", ""))}</b> · s(y_l) {esc(fmt(row.get("rejected_score")))} → '
            f's(y_w*) {esc(fmt(row.get("chosen_score")))} · word edits: {word_edits(old, new)} to y_l\'s '
            f'{len(old.split())} words (added words count)<br><b>prompt</b>: <span class="diff">{esc(prompt_text(row.get("prompt", "")))}</span><br>'
            + (f"<b>diagnosis</b>: {esc(diagnosis)}<br>" if diagnosis else "") +
            f'<b>y_l → y_w*</b>: <div class="diff">{word_diff(old, new)}</div></div>')


def distill_report(out, summary, train_rows, sample=12):
    """<out>/report.html of a distill run (its summary and the train.jsonl rows); returns its path."""
    refined = [r for r in train_rows if (r.get("provenance") or {}).get("source", "refined") == "refined"]
    margins = [r["chosen_score"] - r["rejected_score"] for r in refined
               if isinstance(r.get("chosen_score"), (int, float)) and isinstance(r.get("rejected_score"), (int, float))]
    min_delta = (summary.get("config") or {}).get("min_delta")
    sections = [html_table(["teacher", "url", "template", "JSON mode", "wall s"],
                      [(summary.get("teacher_model", ""), summary.get("teacher_url", ""),
                        summary.get("template_version", ""), str(summary.get("json_mode")),
                        summary.get("wall_s", 0.0))]),
                "<h2>Stages</h2>", stage_table(summary), "<h2>Filters and position bias</h2>", filter_table(summary),
                "<h2>Teacher margins Δs = s(y_w*) − s(y_l) of the refined pairs</h2>",
                histogram("Δs of the refined pairs (dashed: --min-delta)", {"refined pairs": margins}, mark=min_delta,
                          xlabel="Δs", step=0.5 if all((2 * m).is_integer() for m in margins) else None)
                if margins else note("No refined pair was kept."),
                f"<h2>Refined pairs: the edit from y_l to y_w* (first {min(sample, len(refined))} of "
                f"{len(refined)})</h2>", *[pair_view(r) for r in refined[:sample]]]
    return write_page(os.path.join(out, "report.html"), f"rmd distill: {out}", sections)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit("usage: python report.py OUT_DIR   (a folder written by `rmd.py train`)")
    print(train_report(sys.argv[1]))
