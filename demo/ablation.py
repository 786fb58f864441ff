"""ablation.py -- does each of the teacher's abilities make a better student? Measured in the simulated world.

For each world seed: one distill run through the real pipeline (distill.py) against the simulated teacher
(sim.py), so every arm below shares its teacher requests; then the same student, steps and evaluation sets for each
arm, trained through rmd.py. The student is the built-in tiny model after LM pretraining on the world's text
(tiny_lm.tiny_backbone: it knows the tasks' answers, as a real pretrained student knows facts), except in arms k, l, p:

    a  label distillation      bt   on the teacher-labelled original pairs (annotated.jsonl: every row's)
    b  + scoring               mse  with the teacher's annotation scores, original pairs
    c  + refinement            bt   on the refined pairs (the 'refined' rows of train.jsonl)
    d  refinement + scoring    mse  on the refined pairs
    e  the paper's recipe      d + LM regularization on the teacher answers
    f  GRM-style               a + LM regularization
    g  both pair sets          mse  on refined and original pairs together + LM regularization
    h  the previous default    e + the restyle ability: y_w* and y_l rewritten in one other style, giving
                               restyled, crossed (restyled answer on either side) and margin-0 style-equivalence pairs
    i  h without LM regularization (what generation adds)
    j  h with bt (what scoring adds; bt cannot learn the margin-0 pairs, they are dropped)
    k  h with the from-scratch tiny student (what pretraining adds)
    l  a with the from-scratch tiny student
    m  h + the original pairs of the kept rows (train.jsonl's 'original' rows: the teacher-labelled input pair of
       every row whose y_l refine had to fix; rows refine left unchanged differ in style only and give none)
    n  rmd's default recipe    m with bt (= j + those original pairs) + the likelihood term
    o  n without LM regularization
    p  n with the from-scratch tiny student
    q  n without the restyle ability (refined pairs + the kept rows' original pairs only)
    r  n without the likelihood term (the previous recipe)
    s  f + the likelihood term (label distillation with LM regularization and the likelihood term)

n, o, p, q and s add the likelihood term to the reward: + w x the student's own log-likelihood of the answer (its
LM head; w learned; model.RewardModel); the other arms do not.

Every choice of recipe (pair sets, loss, steps) and the LM weight (a sweep of the default arm) is made on the `valid`
split (tasks of its own, asked neither in distill nor in the test splits, so memorising the teacher's mistakes does
not look good there: sim.select_tasks; its normal-like and hard-like halves are reported apart), never on
normal/hard/mirror/best-of-N. mirror is the style trap the other way round (a correct fancy answer against a wrong
plain one). Also: the teacher's own accuracy as a judge, and best-of-N (N candidates per held-out prompt,
each arm's RM picks one, scored by the true quality of what it picks; rmd.py bon's scoring path) standing in for the
paper's RL result.

    python -m demo.ablation                                  # 3 seeds, the default world
    python -m demo.ablation --seeds=0,1,2 --verbosity-bias=1.6 --out=runs/ablation-verbose
    python -m demo.ablation --seeds=7 --arms=a,n --steps=5 --sweep=0.1   # a smoke test

Writes <out>/results.json (with "default_arm") and <out>/table.md; every run's files stay under <out>/seed<S>/.
"""

if not __package__:  # run as a file: the repository's modules are importable only from its root
    raise SystemExit("error: run it from the repository root as a module: python -m demo.ablation")

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields

from cli import one_line_errors, parse_overrides
from demo import sim, sim_server
from formats import write_jsonl
from recipe import RECIPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
ARMS = {  # name: (pairs, loss, LM regularization on?, student, label)
    "a": ("original", "bt", False, "tiny", "label distillation (bt, original pairs)"),
    "b": ("original", "mse", False, "tiny", "+ scoring (mse, original pairs)"),
    "c": ("refined", "bt", False, "tiny", "+ refinement (bt, refined pairs)"),
    "d": ("refined", "mse", False, "tiny", "refinement + scoring (mse, refined pairs)"),
    "e": ("refined", "mse", True, "tiny", "paper's full method (d + LM reg)"),
    "f": ("original", "bt", True, "tiny", "GRM-style (a + LM reg)"),
    "g": ("both", "mse", True, "tiny", "refined + original pairs, mse + LM reg"),
    "h": ("full", "mse", True, "tiny", "the previous default: e + restyled & style-equivalence pairs"),
    "i": ("full", "mse", False, "tiny", "h without LM reg (no generation)"),
    "j": ("full", "bt", True, "tiny", "h with bt (no scoring: margin-0 pairs dropped)"),
    "k": ("full", "mse", True, "scratch", "h with the from-scratch student"),
    "l": ("original", "bt", False, "scratch", "a with the from-scratch student"),
    "m": ("mixed", "mse", True, "tiny", "h + the kept rows' original pairs"),
    "n": ("mixed", RECIPE.loss, RECIPE.lm_weight > 0, "tiny",
          "rmd's recipe (recipe.py): j + the kept rows' original pairs + the likelihood term"),
    "o": ("mixed", "bt", False, "tiny", "n without LM reg (no generation)"),
    "p": ("mixed", "bt", True, "scratch", "n with the from-scratch student"),
    "q": ("refined_original", "bt", True, "tiny", "n without restyle (refined + kept rows' original pairs)"),
    "r": ("mixed", "bt", True, "tiny", "n without the likelihood term (the previous recipe)"),
    "s": ("original", "bt", True, "tiny", "f + the likelihood term (label distillation, LM reg, likelihood)"),
}
# the arms whose reward adds w x the student's log-likelihood of the answer (`rmd.py train --likelihood`): the
# recipe's and what removing another part of it costs; every other arm runs without it
LIKELIHOOD_ARMS = {"o", "p", "q", "s"} | ({"n"} if RECIPE.likelihood else set())
DEFAULT_ARM = "n"  # the recipe (recipe.RECIPE): tests/test_recipe.py checks that this arm runs exactly it
DEFAULT_ARMS = "a,e,j,n,o,p,q,r"  # n and what removing each part of it costs; the others on request (--arms)
PAIR_SOURCES = {"refined": ("refined",), "full": ("refined", "restyled", "crossed", "equivalent"),  # train.jsonl rows
                "mixed": ("refined", "restyled", "crossed", "equivalent", "original"),
                "refined_original": ("refined", "original")}


def run_distill(world, data_paths, out_dir, workers):
    """Distill the world's default input once, through distill.py against the sim teacher."""
    import distill
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        return json.load(open(os.path.join(out_dir, "summary.json")))
    url, shutdown = sim_server.start_server(world, port=0)
    try:
        summary = distill.distill(distill.DistillConfig(
            data=data_paths["distill"], out=out_dir, teacher_url=url, teacher_model=sim.TEACHER_MODEL,
            workers=workers, seed=world.seed, progress=False))
    finally:
        shutdown()
    return summary


def train_arm(name, pairs_file, loss, lm_weight, likelihood, eval_data, out_dir, args, seed, model):
    """One training run through `rmd.py train` in a subprocess; returns its eval.json."""
    if not os.path.exists(os.path.join(out_dir, "eval.json")):
        if args.report:
            return None
        cmd = [sys.executable, os.path.join(ROOT, "rmd.py"), "train",
               *arm_options(pairs_file, loss, lm_weight, likelihood, eval_data, out_dir, args, seed, model),
               *resume_or_start_again(out_dir)]
        t0 = time.time()
        with open(os.path.join(os.path.dirname(out_dir), f"{os.path.basename(out_dir)}.log"), "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"error: training arm {name} failed (exit {proc.returncode}); see {log.name}\n"
                             f"command: {' '.join(cmd)}")
        print(f"  arm {name:<10} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(out_dir, "eval.json")) as f:
        return json.load(f)


def resume_or_start_again(out_dir):
    """A run killed before its eval.json: ["--resume"] when it left a whole checkpoint (the ablation saves one, at
    the end), else its folder goes and it starts again: [] (`rmd.py train` refuses an earlier run without --resume)."""
    import distributed
    if distributed.checkpoint_dir(os.path.join(out_dir, "ckpt")):
        return ["--resume"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return []


def arm_options(pairs_file, loss, lm_weight, likelihood, eval_data, out_dir, args, seed, model):
    """`rmd.py train`'s options for one arm: the arm's pairs, loss, LM weight and likelihood term, everything else the
    recipe's unless --steps, --batch-size or --lr say otherwise (-1 / 0 are train's own "the recipe's")."""
    return [f"--data={pairs_file}", f"--eval-data={eval_data}", f"--out={out_dir}", f"--model={model}",
            f"--loss={loss}", f"--lm-weight={lm_weight}", f"--likelihood={str(likelihood).lower()}",
            f"--max-steps={args.steps}",
            f"--batch-size={args.batch_size}", f"--lr={args.lr}", f"--seed={seed}", f"--max-len={args.max_len}",
            "--log-interval=50", f"--layers={args.layers if model == args.student else 0}"]


def best_of_n_correct(model_dir, bon_path, max_len):
    """Share of correct answers among the candidates the RM picks (rmd.py bon's own scoring path)."""
    import evaluation
    from formats import read_located_rows
    from model import load_reward_model
    rows = read_located_rows(bon_path)
    scored = evaluation.best_of_n(load_reward_model(model_dir), rows, batch_size=64, max_len=max_len)
    return evaluation.pick_quality(rows, scored)["picked"]["correct"]


def mean_sd(values):
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


@dataclass
class AblationConfig(sim.WorldConfig):
    """The world's options (sim.WorldConfig) and the ablation's own."""
    seeds: str = "0,1,2"  # comma-separated world and training seeds
    arms: str = DEFAULT_ARMS  # comma-separated subset of the arms a-q (see the docstring)
    steps: int = -1  # optimizer steps per training run (-1 = the recipe's: at least 400 and at least one pass)
    batch_size: int = RECIPE.batch_size  # pairs per optimizer step
    lr: float = 0.0  # peak learning rate (0 = the recipe's rule by the student's size)
    max_len: int = 256  # tokens per sequence
    student: str = ""  # the pretrained student of the arms that use one ("" = the tiny model pretrained on this world's text; e.g. a SmolLM2 .gguf with --layers)
    layers: int = 0  # keep the first N layers of --student (0 = all)
    # LM weights tried for the default arm on the first seed, chosen on valid by the one-SE rule (the recipe's
    # weight alone = no sweep; --sweep=0.1,1.0 is how the recipe's was chosen)
    sweep: str = str(RECIPE.lm_weight)
    jobs: int = 2  # training runs in parallel (each gets cores/jobs threads)
    workers: int = 8  # distill requests in flight
    out: str = "runs/ablation"  # where every run, results.json and table.md go
    report: bool = False  # train nothing: tabulate the runs already finished under --out (a run resumes otherwise)


def main(argv=None):
    args = parse_overrides(AblationConfig(), list(sys.argv[1:] if argv is None else argv),
                           "python -m demo.ablation", __doc__.split("\n")[0])
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"error: unknown arm(s) {unknown}; choose from {','.join(ARMS)}")
    sweep = [float(x) for x in args.sweep.split(",")]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    t_start = time.time()
    # 0. the pretrained student: the tiny model after LM pretraining on this world's text (built once, cached)
    from demo import tiny_lm
    args.student = args.student or tiny_lm.tiny_backbone(world_of(args))
    students = {"tiny": args.student, "scratch": "tiny-scratch"}
    info = os.path.join(args.student, "pretrain.json")
    knowledge = json.load(open(info))["knowledge"] if os.path.exists(info) else None
    worlds = {seed: distill_world(args, seed) for seed in seeds}  # 1. data and one distill run per world seed
    single = len(sweep) == 1 and DEFAULT_ARM in arms  # nothing to choose: that run goes with the arms, in parallel
    lm_weight, sweep_result = sweep_lm_weight(args, worlds[seeds[0]], seeds[0], sweep, students, single)  # 2.
    results = train_arms(args, worlds, seeds, arms, lm_weight, students)  # 3. every arm, every seed
    if single and results.get(DEFAULT_ARM, [{}])[0].get("seed") == seeds[0]:
        sweep_result[lm_weight] = results[DEFAULT_ARM][0]["valid"]
    refs = references(worlds, seeds)  # 4. the teacher as a judge, random / oracle picks for best-of-N
    table = "\n".join(table_lines(args, worlds, seeds, arms, results, refs, lm_weight, sweep, sweep_result,
                                   knowledge) + [f"Total wall time {time.time() - t_start:.0f}s."])  # 5.
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"default_arm": DEFAULT_ARM, "args": vars(args), "lm_weight": lm_weight, "sweep": sweep_result,
                   "arms": results, "references": refs, "student_knowledge": knowledge}, f, indent=1)
    return results


def distill_world(args, seed):
    """One world seed's data and distill run -> {world, paths, files (pair sets), eval_data, dir, counts, summary}."""
    world = world_of(args)
    world.seed = seed
    seed_dir = os.path.join(args.out, f"seed{seed}")
    paths = sim.write_builtin_data(os.path.join(seed_dir, "data"), world)
    t0 = time.time()
    distill_dir = os.path.join(seed_dir, "distill")
    summary = run_distill(world, paths, distill_dir, args.workers)
    files = pair_files(distill_dir)
    counts = {k: sum(1 for _ in open(v)) for k, v in files.items()}
    print(f"seed {seed}: distill {time.time() - t0:.0f}s, {summary['rows']} rows -> {counts['refined']} refined "
          f"pairs ({counts['full']} with the restyled and style-equivalence pairs, {counts['mixed']} with the "
          f"kept rows' original pairs too), {counts['original']} labelled original pairs", flush=True)
    paths.update(split_valid(paths["valid"]))
    eval_data = ",".join(f"{s}={paths[s]}" for s in ("normal", "hard", "mirror", "valid_normal", "valid_hard"))
    return dict(world=world, paths=paths, files=files, eval_data=eval_data, dir=seed_dir, counts=counts,
                summary=summary)


def sweep_lm_weight(args, first, seed, sweep, students, single):
    """The LM-weight sweep: the default arm on the first seed, chosen on the validation split (never normal/hard)
    -> (the chosen weight, {weight: valid accuracy})."""
    pairs0, loss0, _, student0, _ = ARMS[DEFAULT_ARM]
    sweep_result = {}
    jobs = [(f"sweep-{w:g}", first["files"][pairs0], loss0, w, DEFAULT_ARM in LIKELIHOOD_ARMS, first["eval_data"],
             os.path.join(first["dir"], f"sweep_{DEFAULT_ARM}_lm{w:g}"), seed, students[student0]) for w in sweep]
    for job, res in zip(jobs, _run_parallel([] if single else jobs, args)):
        if res is not None:
            sweep_result[job[3]] = valid_accuracy(res["accuracy"])
    if single:
        return sweep[0], sweep_result
    sweep = [w for w in sweep if w in sweep_result]
    if not sweep:
        raise SystemExit(f"error: no finished sweep run under {first['dir']}; run without --report first")
    lm_weight = pick_lm_weight(sweep_result, valid_pairs(first["paths"]["valid"]))
    print(f"sweep (arm {DEFAULT_ARM}, seed {seed}, valid accuracy): " + ", ".join(
        f"lm_weight {w:g}: {100 * sweep_result[w]:.1f}" for w in sweep) + f" -> {lm_weight:g} (the smallest weight "
        "within one standard error of the best)", flush=True)
    return lm_weight, sweep_result


def pick_lm_weight(valid, n_pairs):
    """The one-standard-error rule: the smallest LM weight whose valid accuracy is within one standard error of the
    best one's (the binomial SE over n_pairs pairs). A smaller weight is the plainer objective; a gain under one SE of
    one seed is not evidence for a larger one (seed 0 of the default world: 0.1 -> 73.0, 1.0 -> 73.5, SE 2.2)."""
    best = max(valid.values())
    se = (best * (1 - best) / n_pairs) ** 0.5
    return min(w for w, acc in valid.items() if acc >= best - se)


def valid_pairs(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def train_arms(args, worlds, seeds, arms, lm_weight, students):
    """Every arm on every seed (parallel jobs) -> {arm: [{seed, split accuracies, valid, bon}]}."""
    jobs = []
    for seed in seeds:
        wd = worlds[seed]
        for arm in arms:
            pairs, loss, lm, student, _ = ARMS[arm]
            w = lm_weight if lm else 0.0
            swept = arm == DEFAULT_ARM and seed == seeds[0]  # the sweep's run at the chosen weight is this one
            out = os.path.join(wd["dir"], f"sweep_{arm}_lm{w:g}" if swept else f"arm_{arm}")
            jobs.append((arm, wd["files"][pairs], loss, w, arm in LIKELIHOOD_ARMS, wd["eval_data"], out, seed,
                         students[student]))
    results = {}
    for job, res in zip(jobs, _run_parallel(jobs, args)):
        arm, seed, out = job[0], job[7], job[6]
        if res is None:
            continue
        bon = best_of_n_correct(os.path.join(out, "model"), worlds[seed]["paths"]["bon"], args.max_len)
        results.setdefault(arm, []).append({"seed": seed, **res["accuracy"], "valid": valid_accuracy(res["accuracy"]),
                                            "bon": bon})
    return results


def references(worlds, seeds):
    """The teacher as a judge (both orders) on normal/hard, and random / oracle picks for best-of-N, per seed."""
    refs = {"teacher": [], "random": [], "oracle": []}
    for seed in seeds:
        wd = worlds[seed]
        acc = {s: sim.teacher_judge_accuracy([json.loads(line) for line in open(wd["paths"][s])], wd["world"])
               for s in ("normal", "hard", "mirror")}
        bon_rows = [json.loads(line) for line in open(wd["paths"]["bon"])]
        refs["teacher"].append({"seed": seed, **acc})
        refs["random"].append({"seed": seed, "bon": statistics.mean(
            statistics.mean(q == 1.0 for q in r["true_quality"]) for r in bon_rows)})
        refs["oracle"].append({"seed": seed, "bon": statistics.mean(max(r["true_quality"]) == 1.0 for r in bon_rows)})
    return refs


def steps_text(steps):
    return f"{steps} steps" if steps >= 0 else f"the recipe's steps (max({RECIPE.min_steps}, one pass))"


def lr_text(lr):
    return f"lr {lr:g}" if lr else "lr by the recipe's rule (recipe.LR_BY_SIZE)"


def table_lines(args, worlds, seeds, arms, results, refs, lm_weight, sweep, sweep_result, knowledge):
    """The results table (markdown) with its header line, the pair counts, the student and the verdict."""
    world0 = worlds[seeds[0]]["world"]
    done = ", ".join(f"{a}: seeds {[r['seed'] for r in results[a]]}" for a in arms if a in results)
    known = (knowledge or {}).get("correct_beats_wrong_same_style", {})
    lines = ([f"Finished runs only (--report): {done}."] if args.report else []) + [
             f"Seeds {seeds}; {steps_text(args.steps)} x {args.batch_size} pairs, {lr_text(args.lr)}; "
             f"LM weight {lm_weight:g} "
             f"(sweep of arm {DEFAULT_ARM} on valid: " +
             ", ".join(f"{w:g} -> {100 * sweep_result[w]:.1f}" for w in sweep if w in sweep_result) +
             f"). Accuracy % on held-out truth-labelled pairs ({world0.n_eval} per split and seed); BoN = % of "
             f"best-of-{world0.bon_n} picks that are correct ({world0.n_bon} prompts per seed). Mean ± std over seeds.",
             "", "| arm | pairs | loss | LM reg | student | normal | hard | mirror | BoN | valid: normal-like / hard-like "
             "half |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        pairs, loss, lm, student, label = ARMS[arm]
        rs = results.get(arm)
        if not rs:
            continue
        name = f"**{arm}. {label}**" if arm == DEFAULT_ARM else f"{arm}. {label}"
        shown = "scratch" if student == "scratch" else os.path.basename(args.student.rstrip("/"))  # which student
        lines.append(f"| {name} | {pairs} | {loss} | {lm_weight if lm else 0:g} | {shown} | "
                     f"{mean_sd([r['normal'] for r in rs])} | {mean_sd([r['hard'] for r in rs])} | "
                     f"{mean_sd([r['mirror'] for r in rs])} | "
                     f"{mean_sd([r['bon'] for r in rs])} | {valid_halves(rs)} |")
    lines.append(f"| teacher as judge (both orders) | - | - | - | - | "
                 f"{mean_sd([r['normal'] for r in refs['teacher']])} | {mean_sd([r['hard'] for r in refs['teacher']])} "
                 f"| {mean_sd([r['mirror'] for r in refs['teacher']])} | - | - |")
    lines.append(f"| random pick / oracle pick | - | - | - | - | - | - | - | "
                 f"{mean_sd([r['bon'] for r in refs['random']])} / {mean_sd([r['bon'] for r in refs['oracle']])} | - |")
    counts = "; ".join(f"seed {s}: {worlds[s]['counts']['refined']} refined, {worlds[s]['counts']['full']} full, "
                       f"{worlds[s]['counts']['mixed']} mixed, {worlds[s]['counts']['original']} original pairs, "
                       f"from {worlds[s]['summary']['rows']} prompts" for s in seeds)
    return lines + ["", f"Training pairs per distill run ({counts}).",
                    f"Student: {args.student}" + (f" (first {args.layers} layers)" if args.layers else "") +
                    ("; before any preference data it ranks the correct answer above a wrong one in the same style "
                     "by LM likelihood on: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in known.items()) +
                     " of tasks." if known else "."),
                    verdict(results, DEFAULT_ARM, "a"),
                    "World: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(world0).items()
                                         if k != "seed")]


def verdict(results, arm, baseline):
    """The bar, spelled out: `arm` within one std of `baseline` or better on normal, mirror and BoN, and 20 points
    better on hard (std: the baseline's std over seeds; one seed: no std, a plain comparison)."""
    if arm not in results or baseline not in results:
        return ""
    parts = []
    for split in ("normal", "hard", "mirror", "bon"):
        x, y = ([100 * r[split] for r in results[k]] for k in (arm, baseline))
        diff = statistics.mean(x) - statistics.mean(y)
        std = statistics.stdev(y) if len(y) > 1 else 0.0
        ok = diff >= 20 if split == "hard" else diff >= -std
        parts.append(f"{split} {diff:+.1f} ({baseline}'s std {std:.1f}: {'meets' if ok else 'misses'} the bar)")
    return f"Arm {arm} vs arm {baseline}: " + ", ".join(parts) + "."


def valid_halves(rows):
    if not all("valid_normal" in r for r in rows):
        return mean_sd([r["valid"] for r in rows]) + " (whole split)"
    return f"{mean_sd([r['valid_normal'] for r in rows])} / {mean_sd([r['valid_hard'] for r in rows])}"


def split_valid(path):
    """valid.jsonl -> its normal-like and hard-like halves (sim.eval_pairs marks each row's kind), so that a choice
    made on valid can weigh natural pairs and style traps the way the bar does, without the test splits."""
    rows = [json.loads(line) for line in open(path)]
    paths = {}
    for kind in ("normal", "hard"):
        paths[f"valid_{kind}"] = path.replace(".jsonl", f"_{kind}.jsonl")
        write_jsonl(paths[f"valid_{kind}"], [r for r in rows if r["kind"] == kind])
    return paths


def valid_accuracy(accuracy):
    """Accuracy on the whole valid split from its two equal halves (or the whole split, for runs made before)."""
    if "valid" in accuracy:
        return accuracy["valid"]
    return (accuracy["valid_normal"] + accuracy["valid_hard"]) / 2


def world_of(args):
    """The sim.WorldConfig part of the ablation's config."""
    return sim.WorldConfig(**{f.name: getattr(args, f.name) for f in fields(sim.WorldConfig)})


def pair_files(distill_dir):
    """The pair sets the arms train on, from one distill run: original (annotated.jsonl), refined (the refined rows of
    train.jsonl), full (all of train.jsonl: refined, restyled and style-equivalence rows), both (refined + original)."""
    rows = [json.loads(line) for line in open(os.path.join(distill_dir, "train.jsonl"))]
    files = {"original": os.path.join(distill_dir, "annotated.jsonl")}
    for name, sources in PAIR_SOURCES.items():
        files[name] = os.path.join(distill_dir, f"pairs_{name}.jsonl")
        write_jsonl(files[name], [r for r in rows if r["provenance"]["source"] in sources])
    files["both"] = os.path.join(distill_dir, "pairs_both.jsonl")
    with open(files["both"], "w") as f:
        for name in (files["refined"], files["original"]):
            f.write(open(name).read())
    return files


def _run_parallel(jobs, args):
    """Run training jobs `args.jobs` at a time; results in job order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(train_arm, name, data, loss, w, likelihood, ev, out, args, seed, model)
                   for name, data, loss, w, likelihood, ev, out, seed, model in jobs]
        return [f.result() for f in futures]


if __name__ == "__main__":
    with one_line_errors():
        main()
