"""The built-in demo: what `python rmd.py distill` (no --teacher-url) and `python rmd.py train` (no --data) do.

distill runs the real pipeline (distill.py) against the simulated teacher (sim.py, served in this process by
sim_server.py) on the simulated world's prompts, and writes the world's held-out eval splits and best-of-N set beside
its output. train trains the tiny student (tiny_lm.py) on what it wrote, with train's defaults (the recipe); beside
it, in its own process, label distillation on the same teacher's labels (the baseline); at the end, what the numbers
mean next to the baseline's, and best-of-N of both. rmd.py calls these; nothing in the library imports them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (rmd.py)
DEMO_OUT = "out/distill"  # where `python rmd.py distill` writes when run on the built-in default
# `python rmd.py distill` with no --teacher-url: the simulated teacher runs in this process, with no rate limit, so
# more requests in flight keep both sides busy (measured on 2 cores: 8 workers 18 s, 16 workers 11 s of distill)
DEMO_DISTILL = dict(out=DEMO_OUT, workers=16)
# `python rmd.py train` with no --data: the built-in tiny student on the demo distill output, sized for a CPU; the
# loss, LM weight, steps and lr are train's defaults, i.e. the recipe (recipe.py), as a user's run gets them
DEMO_TRAIN = dict(data=f"{DEMO_OUT}/train.jsonl", eval_data=",".join(f"{split}={DEMO_OUT}/builtin/{split}.jsonl" for
                                                                     split in ("normal", "hard", "mirror")),
                  model="tiny", max_len=256, log_interval=50)


def distill_builtin(cfg):
    """The demo's distill: write the simulated world's data under <out>/builtin, serve its teacher in this process,
    and run distill.distill on the world's prompts against it -> distill's summary."""
    import distill
    from demo import sim, sim_server
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


def start_demo_baseline(cfg):
    """Label distillation on the same teacher's labels (the original pairs as annotated, bt, no LM term, no likelihood
    term: ablation.py's arm a) with the same student, steps and evaluation: what the demo's numbers are to be
    compared with. It trains in its own process beside the demo's run (half the cores each), logging to
    <out>-label.log. -> (process, its config) or None when distill wrote no annotated pairs."""
    import subprocess
    annotated = os.path.join(os.path.dirname(cfg.data), "annotated.jsonl")
    if not os.path.exists(annotated):
        return None
    base = dataclasses.replace(cfg, data=annotated, loss="bt", lm_weight=0.0, likelihood=False,
                               out=cfg.out.rstrip("/") + "-label")
    cores = os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        import torch
        torch.set_num_threads(max(1, cores - cores // 2))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // 2)))}
    argv = [f"--{k}={v}" for k, v in dataclasses.asdict(base).items()]
    print(f"baseline: label distillation (--loss=bt --lm-weight=0 --likelihood=false on {annotated}, same student and steps) trains "
          f"alongside -> {base.out} (log: {base.out}.log)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(base.out)) or ".", exist_ok=True)
    with open(base.out + ".log", "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "rmd.py"), "train", *argv], stdout=log,
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
    from formats import read_located_rows
    from model import load_reward_model
    rows = read_located_rows(bon_path)
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
             ("mirror", [m["mirror"] for _, m, _ in runs],
              "a correct fancy answer against a wrong, plainer one (the trap the other way round)"),
             (f"best-of-{n}", [b["picked"]["correct"] for b in bon],
              f"share of correct picks among {n} candidates for {bon[0]['rows']} prompts (random pick "
              f"{100 * bon[0]['random']['correct']:.1f}%, oracle {100 * bon[0]['oracle']['correct']:.1f}%)")]
    lines = ["\nWhat the numbers mean (held-out tasks the preference data never asked; chance = 50%):",
             f"  {'':<11}{head}"] + [f"  {name:<11}" + "".join(f"{100 * v:>21.1f}%" for v in values) + f"   {what}"
                                     for name, values, what in table]
    if baseline:
        lines.append("One seed of a small run: differences of a few points are noise; RESULTS.md's ablation has 3 "
                     "seeds and the spread.")
    print("\n".join(lines), flush=True)
