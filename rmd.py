"""rmd: distil a reward model from a generative teacher LLM (RM-Distiller, see METHOD.md).

    python rmd.py distill [--key=value ...]   # teacher pipeline (distill.py): prompts/pairs -> training pairs
    python rmd.py train   [--key=value ...]   # train the student reward model on those pairs
    python rmd.py eval --model DIR --data F   # accuracy on pairs, RewardBench or RM-Bench files (evaluation.py)
    python rmd.py bon --model DIR --data F    # best-of-N: every response's reward and the best one
    python rmd.py serve --model DIR           # HTTP reward server, OpenRLHF --remote_rm_url compatible (serve.py)
    python rmd.py teacher-sim --port=N        # the built-in simulated teacher (demo/sim_server.py), standalone

Every option is a field of a config dataclass (train.TrainConfig for `train`); `--key=value` or `--key value`
overrides it, dashes or underscores, type-checked against the default. The whole config is printed and saved.
`python rmd.py COMMAND --help` lists a command's options with type, default and meaning (the field comments).
A mistake (a bad row, a missing file, a wrong option, an unreachable teacher) is one line starting with `error:`.

This file is the command line only (nothing imports it). In Python:
    import train
    train.train(train.TrainConfig(data="pairs.jsonl", eval_data="test.jsonl", model="path/to/hf-model"))
    from model import load_reward_model
    rm = load_reward_model("out/train/model")
    rm.score(["What is 2+2?"], ["4"])  # -> [reward]

The student is one causal-LM backbone with two heads: its pretrained LM head (kept, trained on the teacher's
answers) and a value head read at the last real token. Rows are packed into bins (several sequences per row,
block-diagonal attention via position ids), so one forward pass covers the chosen, rejected and teacher-answer
rows of a micro-batch with almost no padding. Where things live: model.py (the reward model: tokenization,
backbone, scoring, save/load), batches.py (rows -> packed batches), train.py (config, loss of a step, the loop),
distributed.py (DDP/FSDP2, checkpoints), evaluation.py and serve.py (using a trained model), distill.py + asker.py
(the teacher pipeline) over protocol.py (prompts, parsers) and teacher.py (HTTP client, cache), formats.py (rows),
cli.py (options), recipe.py (the recommended recipe), report.py (report.html), loss.py (the losses). Not library:
demo/ (the simulated world and teacher, the tiny student, the demo's distill and train, the ablation) and tools/
(the benchmarks, a fault-injecting teacher); run them from this folder as modules (`python -m demo.ablation`,
`python -m tools.bench`).
"""
from __future__ import annotations

import dataclasses
import os
import sys

from cli import one_line_errors, parse_overrides
from demo import builtin
from formats import column_keys
from teacher import FatalError, TransportError

# torch and the model code load only for the commands that use them (train, eval, bon, serve): `distill` and
# `teacher-sim` run on a machine without torch and start in a fraction of the time. The demo (what distill and train
# do with no teacher and no data) lives in demo/builtin.py.


# ----------------------------------------------------------------------------------------------------------------
# command line


USAGE = __doc__
ABOUT = {
    "distill": "The teacher pipeline (distill.py): pairs, pools or bare prompts -> refined training pairs. With no "
               "--teacher-url: the built-in simulated teacher on the built-in prompts (the demo), " +
               " ".join(f"--{k}={v}" for k, v in builtin.DEMO_DISTILL.items()) + ".",
    "train": "Train the student reward model on preference pairs (what `rmd.py distill` writes, or your own). With no "
             "--data: the demo, " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in builtin.DEMO_TRAIN.items())
             + ".",
}


def distill_command(argv):
    """`rmd.py distill`: distill.distill, or with no --teacher-url the simulated teacher on the built-in prompts."""
    import distill
    demo = not any(a.replace("_", "-").startswith(("--teacher-url", "-h", "--help")) for a in argv)
    defaults = builtin.DEMO_DISTILL if demo else dict(out=builtin.DEMO_OUT)
    cfg = parse_overrides(distill.DistillConfig(**defaults), argv, "python rmd.py distill", ABOUT["distill"])
    if not cfg.teacher_url and cfg.data:
        raise SystemExit(f"error: --data={cfg.data} needs a teacher: pass --teacher-url=URL (an OpenAI-compatible "
                         "server) and --teacher-model=NAME; the simulated teacher (no --teacher-url) only runs the "
                         "built-in prompts. For a local stand-in: `python rmd.py teacher-sim --port=8000` and "
                         "--teacher-url=http://127.0.0.1:8000/v1 --teacher-model=sim-teacher")
    try:
        if cfg.teacher_url:
            rows = distill.load_distill_rows(cfg.data, cfg.limit, cfg.shard, column_keys(cfg)) if cfg.data else []
            check_bare_prompts(cfg, rows)
            summary = distill.distill(cfg)
        else:
            summary, cfg = builtin.distill_builtin(cfg), dataclasses.replace(cfg, data="builtin")
    except ValueError as e:  # bad input rows: all of them, one per line
        raise SystemExit(f"error: {e}") from None
    except (OSError, FatalError, TransportError) as e:  # a server's reply may hold an HTML page: one line
        raise SystemExit("error: " + " ".join(str(e).split())) from None
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; finished requests are in the cache: run the same command again to "
                         "resume") from None
    say_what_distill_wrote(cfg, summary, demo=not cfg.teacher_url)
    return summary


def check_bare_prompts(cfg, rows):
    bare = [r for r in rows if r["kind"] == "prompt"]
    if bare and not cfg.candidate_models:
        raise SystemExit(f"error: {cfg.data}:{bare[0]['line']}: {len(bare)} row(s) are bare prompts {{prompt}}: "
                         "their two answers are generated first, so pass --candidate-models=m1,m2 (served at "
                         "--candidate-urls, or at --teacher-url)")


def say_what_distill_wrote(cfg, summary, demo):
    """The end of a distill run: what was written where, and what to run next; a run that kept nothing fails."""
    failed = {}
    for stage in summary.get("stages", {}).values():
        for reason, n in stage.get("failures", {}).items():
            failed[reason] = failed.get(reason, 0) + n
    failures = os.path.join(cfg.out, "failures.jsonl")
    if not summary["kept"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted({**summary.get("dropped", {}), **failed}.items())) or "none"
        raise SystemExit(f"error: no pair was kept from {summary['rows']} row(s) (dropped or failed: {why}); every "
                         f"row's reason and the teacher's replies are in {failures}")
    train_file = os.path.join(cfg.out, "train.jsonl")
    extra = (summary.get("restyle") or {}).get("pairs", 0)
    extra = f" + {extra} from the restyle stage" if extra else ""
    if summary.get("original_pairs"):
        extra += f" + {summary['original_pairs']} of their teacher-labelled input pairs"
    print(f"wrote {train_file} ({summary['kept']} refined pairs{extra}), {os.path.join(cfg.out, 'annotated.jsonl')} "
          f"(the teacher-labelled input pairs), {failures} (rows not kept, with reasons), "
          f"{os.path.join(cfg.out, 'summary.json')}, {os.path.join(cfg.out, 'report.html')} (the run in pictures)",
          file=sys.stderr)
    if demo and cfg.out == builtin.DEMO_OUT:
        print("next: python rmd.py train   (the demo student on these pairs)", file=sys.stderr)
    else:
        print(f"next: python rmd.py train --data={train_file} --eval-data=YOUR_TEST.jsonl --model=HF_MODEL "
              f"--out=out/rm", file=sys.stderr)


def train_command(argv):
    from demo import tiny_lm
    from train import TrainConfig, out_lock
    demo = not any(a.replace("_", "-").startswith(("--data", "--dataset", "--train-file", "-h", "--help"))
                   for a in argv)
    cfg = parse_overrides(TrainConfig(**builtin.DEMO_TRAIN) if demo else TrainConfig(), argv, "python rmd.py train",
                          ABOUT["train"])
    if demo and not os.path.exists(cfg.data):
        raise SystemExit(f"error: no --data given and no demo data at {cfg.data}: run `python rmd.py distill` "
                         "first, or pass --data=pairs.jsonl (rows {prompt, chosen, rejected[, chosen_score, "
                         "rejected_score, teacher_response]}; see README.md)")
    bon = os.path.join(os.path.dirname(cfg.data), "builtin", "bon.jsonl")
    # --model=tiny / tiny-scratch: the demo's students, which the library does not know by name
    backbone = tiny_lm.load_tiny if cfg.model in tiny_lm.TINY_NAMES else None
    try:
        with out_lock(cfg):  # before the demo's baseline starts: a second run on --out stops here
            metrics, baseline = train_beside_baseline(cfg, backbone, demo and os.path.exists(bon) and cfg.max_steps)
    except OSError as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks
        return metrics
    model = os.path.join(cfg.out, "model")
    if demo and metrics and os.path.exists(bon):
        builtin.explain_demo(cfg, metrics, bon, builtin.finish_demo_baseline(baseline))
        print(f"next: python rmd.py bon --model={model} --data={bon}   (best-of-N against the true quality)")
    print(f"next: python rmd.py eval --model={model} --data=PAIRS.jsonl | python rmd.py serve --model={model}")
    return metrics


def train_beside_baseline(cfg, backbone, with_baseline):
    """train(cfg), with the demo's label-distillation baseline training beside it when asked -> (metrics, baseline)."""
    from train import check_fresh_out, train
    baseline = None
    if with_baseline:
        check_fresh_out(cfg)  # train() would refuse it: before the baseline starts
        baseline = builtin.start_demo_baseline(cfg)
    try:
        return train(cfg, on_step=builtin.take_back_cores(baseline), backbone=backbone), baseline
    finally:
        if baseline and baseline[0].poll() is None and sys.exc_info()[0] is not None:
            baseline[0].terminate()  # the demo failed or was interrupted: its baseline goes too


COMMANDS = ("distill", "train", "eval", "bon", "serve", "teacher-sim")


def options_markdown():
    """OPTIONS.md: every command's --help exactly as it prints (`python rmd.py options > OPTIONS.md`)."""
    import contextlib
    import io
    parts = ["# rmd's options", "", "Every command's `--help`, as printed. Generated: "
             "`python rmd.py options > OPTIONS.md` (tests/test_cli.py fails when this file is stale).", ""]
    for command in COMMANDS:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                main([command, "--help"])
            except SystemExit:  # --help exits 0 after printing
                pass
        parts += [f"## `python rmd.py {command}`", "", "```", printed.getvalue().rstrip(), "```", ""]
    return "\n".join(parts)


def main(argv=None):
    """Run one command; the library's one-line errors (UsageError, DataError) become `error: ...` and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "options":
        print(options_markdown(), end="")
        return 0
    with one_line_errors():
        return run_command(argv[0], argv[1:])


def run_command(command, rest):
    if command == "train":
        train_command(rest)
    elif command == "distill":
        distill_command(rest)
    elif command == "teacher-sim":
        from demo import sim_server
        return sim_server.main(rest, "python rmd.py teacher-sim")
    elif command in ("eval", "bon"):
        import evaluation
        {"eval": evaluation.eval_command, "bon": evaluation.bon_command}[command](rest)
    elif command == "serve":
        import serve
        serve.serve_command(rest)
    else:
        import difflib
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        raise SystemExit(f"error: unknown command {command!r}" + (f"; did you mean {close[0]}?" if close else "")
                         + f" (commands: {', '.join(COMMANDS)}; `python rmd.py COMMAND --help` lists its options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
