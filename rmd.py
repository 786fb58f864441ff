"""rmd: distil a reward model from a generative teacher LLM (RM-Distiller, see METHOD.md).

    python rmd.py distill [--key=value ...]   # teacher pipeline (distill.py): prompts/pairs -> training pairs
    python rmd.py train   [--key=value ...]   # train the student reward model on those pairs
    python rmd.py eval --model DIR --data F   # accuracy on pairs, RewardBench or RM-Bench files (evaluation.py)
    python rmd.py bon --model DIR --data F    # best-of-N: every response's reward and the best one
    python rmd.py serve --model DIR           # HTTP reward server, OpenRLHF --remote_rm_url compatible (serve.py)
    python rmd.py teacher-sim --port=N        # the built-in simulated teacher (sim_server.py), standalone

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
(the teacher pipeline) over protocol.py (prompts, parsers) and teacher.py (HTTP client, cache), sim.py + sim_server.py
(the simulated teacher), formats.py (rows), cli.py (options), loss.py (the losses).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from cli import parse_overrides
from formats import DataError, column_keys
from teacher import FatalError, TransportError

# torch and the model code load only for the commands that use them (train, eval, bon, serve): `distill` and
# `teacher-sim` run on a machine without torch and start in a fraction of the time.


# ----------------------------------------------------------------------------------------------------------------
# command line


USAGE = __doc__
DEMO_OUT = "out/distill"  # where `python rmd.py distill` writes when run on the built-in default
# `python rmd.py distill` with no --teacher-url: the simulated teacher runs in this process, with no rate limit, so
# more requests in flight keep both sides busy (measured on 2 cores: 8 workers 18 s, 16 workers 11 s of distill)
DEMO_DISTILL = dict(out=DEMO_OUT, workers=16)
# `python rmd.py train` with no --data: the built-in tiny student on the demo distill output, sized for a CPU; the
# loss, LM weight, steps and lr are train's defaults, i.e. the recipe (recipe.py), as a user's run gets them
DEMO_TRAIN = dict(data=f"{DEMO_OUT}/train.jsonl", eval_data=f"normal={DEMO_OUT}/builtin/normal.jsonl,"
                  f"hard={DEMO_OUT}/builtin/hard.jsonl", model="tiny", max_len=256, log_interval=50)


ABOUT = {
    "distill": "The teacher pipeline (distill.py): pairs, pools or bare prompts -> refined training pairs. With no "
               "--teacher-url: the built-in simulated teacher on the built-in prompts (the demo), " +
               " ".join(f"--{k}={v}" for k, v in DEMO_DISTILL.items()) + ".",
    "train": "Train the student reward model on preference pairs (what `rmd.py distill` writes, or your own). With no "
             "--data: the demo, " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in DEMO_TRAIN.items()) + ".",
}


def distill_command(argv):
    """`rmd.py distill`: distill.distill, or with no --teacher-url the simulated teacher on the built-in prompts."""
    import distill
    builtin = not any(a.replace("_", "-").startswith(("--teacher-url", "-h", "--help")) for a in argv)
    cfg = parse_overrides(distill.DistillConfig(**(DEMO_DISTILL if builtin else dict(out=DEMO_OUT))), argv,
                          "python rmd.py distill", ABOUT["distill"])
    if not cfg.teacher_url and cfg.data:
        raise SystemExit(f"error: --data={cfg.data} needs a teacher: pass --teacher-url=URL (an OpenAI-compatible "
                         "server) and --teacher-model=NAME; the simulated teacher (no --teacher-url) only runs the "
                         "built-in prompts. For a local stand-in: `python rmd.py teacher-sim --port=8000` and "
                         "--teacher-url=http://127.0.0.1:8000/v1 --teacher-model=sim-teacher")
    try:
        if cfg.teacher_url:
            rows = distill.load_rows(cfg.data, cfg.limit, cfg.shard, column_keys(cfg)) if cfg.data else []
            check_bare_prompts(cfg, rows)
            summary = distill.distill(cfg)
            demo = False
        else:
            summary, cfg, demo = distill_builtin(cfg), dataclasses.replace(cfg, data="builtin"), True
    except ValueError as e:  # bad input rows: all of them, one per line
        raise SystemExit(f"error: {e}") from None
    except (OSError, FatalError, TransportError) as e:  # a server's reply may hold an HTML page: one line
        raise SystemExit("error: " + " ".join(str(e).split())) from None
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; finished requests are in the cache: run the same command again to "
                         "resume") from None
    say_what_distill_wrote(cfg, summary, demo)
    return summary


def check_bare_prompts(cfg, rows):
    bare = [r for r in rows if r["kind"] == "prompt"]
    if bare and not cfg.candidate_models:
        raise SystemExit(f"error: {cfg.data}:{bare[0]['line']}: {len(bare)} row(s) are bare prompts {{prompt}}: "
                         "their two answers are generated first, so pass --candidate-models=m1,m2 (served at "
                         "--candidate-urls, or at --teacher-url)")


def distill_builtin(cfg):
    import distill
    import sim
    import sim_server
    from files import folder_lock
    world = sim.WorldConfig(seed=cfg.seed)
    with folder_lock(cfg.out, "distill"):  # the built-in data too is written by one run at a time
        paths = sim.write_builtin_data(os.path.join(cfg.out, "builtin"), world)
        url, shutdown = sim_server.start_server(world)
        print(f"no --teacher-url: using the built-in simulated teacher at {url} (sim.py) on the built-in prompts "
              f"({paths['distill']}); held-out eval splits in {os.path.dirname(paths['normal'])}", file=sys.stderr)
        try:
            return distill.distill(dataclasses.replace(cfg, teacher_url=url, teacher_model=sim.TEACHER_MODEL,
                                                       data=paths["distill"]))
        finally:
            shutdown()


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
    if demo and cfg.out == DEMO_OUT:
        print("next: python rmd.py train   (the demo student on these pairs)", file=sys.stderr)
    else:
        print(f"next: python rmd.py train --data={train_file} --eval-data=YOUR_TEST.jsonl --model=HF_MODEL "
              f"--out=out/rm", file=sys.stderr)


def train_command(argv):
    from files import FolderBusy
    from train import TrainConfig, out_lock
    demo = not any(a.replace("_", "-").startswith(("--data", "--dataset", "--train-file", "-h", "--help"))
                   for a in argv)
    cfg = parse_overrides(TrainConfig(**DEMO_TRAIN) if demo else TrainConfig(), argv, "python rmd.py train",
                          ABOUT["train"])
    if demo and not os.path.exists(cfg.data):
        raise SystemExit(f"error: no --data given and no demo data at {cfg.data}: run `python rmd.py distill` "
                         "first, or pass --data=pairs.jsonl (rows {prompt, chosen, rejected[, chosen_score, "
                         "rejected_score, teacher_response]}; see README.md)")
    bon = os.path.join(os.path.dirname(cfg.data), "builtin", "bon.jsonl")
    try:
        with out_lock(cfg):  # before the demo's baseline starts: a second run on --out stops here
            metrics, baseline = train_beside_baseline(cfg, demo and os.path.exists(bon) and cfg.max_steps)
    except (DataError, OSError, FolderBusy) as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks
        return metrics
    model = os.path.join(cfg.out, "model")
    if demo and metrics and os.path.exists(bon):
        explain_demo(cfg, metrics, bon, finish_demo_baseline(baseline))
        print(f"next: python rmd.py bon --model={model} --data={bon}   (best-of-N against the true quality)")
    print(f"next: python rmd.py eval --model={model} --data=PAIRS.jsonl | python rmd.py serve --model={model}")
    return metrics


def train_beside_baseline(cfg, with_baseline):
    """train(cfg), with the demo's label-distillation baseline training beside it when asked -> (metrics, baseline)."""
    from train import check_fresh_out, train
    baseline = None
    if with_baseline:
        check_fresh_out(cfg)  # train() would refuse it: before the baseline starts
        baseline = start_demo_baseline(cfg)
    try:
        return train(cfg, on_step=take_back_cores(baseline)), baseline
    finally:
        if baseline and baseline[0].poll() is None and sys.exc_info()[0] is not None:
            baseline[0].terminate()  # the demo failed or was interrupted: its baseline goes too


def start_demo_baseline(cfg):
    """Label distillation on the same teacher's labels (the original pairs as annotated, bt, no LM term: ablation.py's
    arm a) with the same student, steps and evaluation: what the demo's numbers are to be compared with. It trains in
    its own process beside the demo's run (half the cores each), logging to <out>-label.log. -> (process, its config)
    or None when distill wrote no annotated pairs."""
    import subprocess
    annotated = os.path.join(os.path.dirname(cfg.data), "annotated.jsonl")
    if not os.path.exists(annotated):
        return None
    base = dataclasses.replace(cfg, data=annotated, loss="bt", lm_weight=0.0, out=cfg.out.rstrip("/") + "-label")
    cores = os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        import torch
        torch.set_num_threads(max(1, cores - cores // 2))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // 2)))}
    argv = [f"--{k}={v}" for k, v in dataclasses.asdict(base).items()]
    print(f"baseline: label distillation (--loss=bt --lm-weight=0 on {annotated}, same student and steps) trains "
          f"alongside -> {base.out} (log: {base.out}.log)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(base.out)) or ".", exist_ok=True)
    with open(base.out + ".log", "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "train", *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    return proc, base


def take_back_cores(started):
    """The demo's on_step: once the baseline's process has exited, this run uses the cores it had lent it (the
    baseline has fewer steps' work and ends first; the rest of this run, its eval and best-of-N, go faster)."""
    if started is None or "OMP_NUM_THREADS" in os.environ:  # no baseline, or the user set the threads: leave them
        return None
    import torch
    cores = os.cpu_count() or 1

    def on_step(step, numbers):
        if torch.get_num_threads() < cores and started[0].poll() is not None:
            torch.set_num_threads(cores)
    return on_step


def finish_demo_baseline(started):
    """Wait for the baseline -> (its metrics, its model folder), or None (said why) if it failed."""
    if started is None:
        return None
    proc, base = started
    if proc.wait():
        print(f"baseline: failed (exit {proc.returncode}); see {base.out}.log", flush=True)
        return None
    with open(os.path.join(base.out, "eval.json")) as f:
        return json.load(f)["accuracy"], os.path.join(base.out, "model")


def explain_demo(cfg, metrics, bon_path, baseline=None):
    """The demo's last lines: what its numbers mean, next to label distillation's, and best-of-N of both models."""
    import evaluation
    from formats import read_rows
    from model import load_reward_model
    rows = read_rows(bon_path)
    n = len(rows[0][1]["responses"])
    runs = [("rmd (this run)", metrics, os.path.join(cfg.out, "model"))] + \
        ([("label distillation", *baseline)] if baseline else [])
    bon = [evaluation.pick_quality(rows, evaluation.best_of_n(load_reward_model(path), rows, max_len=cfg.max_len))
           for _, _, path in runs]
    head = "".join(f"{name:>22}" for name, _, _ in runs)
    table = [("normal", [m["normal"] for _, m, _ in runs],
              "a correct and a wrong answer from the natural candidate pool"),
             ("hard", [m["hard"] for _, m, _ in runs],
              "a correct plain answer against a wrong, fancier one (style trap)"),
             (f"best-of-{n}", [b["picked"]["correct"] for b in bon],
              f"share of correct picks among {n} candidates for {bon[0]['rows']} prompts (random pick "
              f"{100 * bon[0]['random']['correct']:.1f}%, oracle {100 * bon[0]['oracle']['correct']:.1f}%)")]
    lines = ["\nWhat the numbers mean (held-out tasks the preference data never asked; chance = 50%):",
             f"  {'':<11}{head}"] + [f"  {name:<11}" + "".join(f"{100 * v:>21.1f}%" for v in values) + f"   {what}"
                                     for name, values, what in table]
    if baseline:
        lines.append("One seed of a small run: differences of a few points are noise; RESULTS.md's ablation has 3 seeds "
                     "and the spread.")
    print("\n".join(lines), flush=True)


COMMANDS = ("distill", "train", "eval", "bon", "serve", "teacher-sim")


def options_markdown():
    """OPTIONS.md: every command's --help exactly as it prints (`python rmd.py options > OPTIONS.md`)."""
    import contextlib
    import io
    parts = ["# rmd's options", "", "Every command's `--help`, as printed. Generated: `python rmd.py options > OPTIONS.md` "
             "(tests/test_rmd.py fails when this file is stale).", ""]
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "options":
        print(options_markdown(), end="")
        return 0
    if command == "train":
        train_command(rest)
    elif command == "distill":
        distill_command(rest)
    elif command == "teacher-sim":
        import sim_server
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
