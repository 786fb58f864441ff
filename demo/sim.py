"""sim.py -- a built-in simulated teacher's world, in which every answer's true quality is known.

No strong teacher LLM is reachable from a CPU box, and a first-time user has none configured. This module is
the stand-in's world: a small world of verifiable tasks, several simulated candidate models of different skill and
style, and a teacher with the flaws measured in real LLM judges; sim_server.py serves it behind the same
OpenAI-compatible protocol distill.py speaks (protocol.py). Because the truth is known, it also writes the
held-out evaluation splits.

    python -m demo.sim_server --port 8000           # serve the simulated teacher alone (also: rmd.py teacher-sim)
    python -m demo.sim_server --write-data data/builtin  # write distill input, eval splits and best-of-N set
    python -m demo.sim_server --stats               # measure the teacher's biases against the published figures

    from demo import sim, sim_server
    url, stop = sim_server.start_server(sim.WorldConfig(), port=0)   # loopback, background thread
    paths = sim.write_builtin_data("out/data", sim.WorldConfig())

The world (all of it seeded by WorldConfig.seed; every default is documented in WorldConfig):
- tasks: five verifiable families (add, capital, upper, reverse, count) with short prompts and answers;
- true quality q in [0, 1]: 1 if correct, partial credit for near misses (an off-by-one number, a string with
  most characters right); true score = 1 + 9 q. Style never enters the truth;
- candidate models: four, from weak and terse to strong and fancy, so that, as in real preference data,
  length and markdown correlate with correctness without causing it;
- teacher: writes correct answers (generate); judges pairs with position bias, verbosity bias, score noise and
  now and then a malformed reply (annotate); fixes only the wrong value in the weaker answer, keeping its wording
  (refine); re-scores anchored on the stated earlier score (score); rewrites an answer in another style, now and
  then changing its value (restyle); says whether a rewrite kept the original's value, now and then wrongly
  (restyle_check).
"""
import dataclasses
import functools
import json
import os
import random
import re
from dataclasses import dataclass

from formats import write_jsonl

# -----------------------------------------------------------------------------
# the world's options


@dataclass
class WorldConfig:
    seed: int = 0               # seeds the whole world: the task split, the candidates' answers, the teacher's flaws
    # data sizes
    n_distill: int = 800        # distill input rows {prompt, responses: [a, b]} (two candidate models per prompt)
    n_eval: int = 400           # pairs per evaluation split (normal, hard) and per validation split
    n_bon: int = 200            # best-of-N prompts
    bon_n: int = 8              # candidates per best-of-N prompt
    # share of add/upper/reverse/count tasks kept out of the distill set: normal, hard and best-of-N ask only these
    # unseen tasks. Capital facts are never held out (no student can know a fact it never saw): they are trained on
    # and appear in valid
    heldout_frac: float = 0.3
    # share of the remaining add/upper/reverse/count tasks kept out of the distill set for the `valid` split, the one
    # split settings are chosen on: tasks of its own, never asked in distill nor in the test splits, so that a recipe
    # that memorises the teacher's mistakes on the distill tasks does not look good there
    select_frac: float = 0.15
    max_operand: int = 9        # add: operands 0..max_operand
    # candidate models: skill = P(correct); each writes its own style with P = style_purity, else a random one.
    # Better models write longer and fancier answers, as in real preference data (Singhal et al. 2023,
    # "A Long Way to Go: Investigating Length Correlations in RLHF"; Dubois et al. 2024). Set all skills equal
    # to remove the correlation.
    skills: str = "0.35,0.55,0.7,0.85"   # P(correct) of the candidate models sim-terse, -plain, -padded, -markdown
    style_purity: float = 0.8   # P(a candidate model writes in its own style; else in a random one)
    # teacher
    teacher_skill: float = 0.97  # P(the teacher knows a task's answer); it is consistently wrong on the rest
    # Position bias, in score points added to Assistant 1. With the other defaults, 0.6 gives 65% order-consistent
    # verdicts on pairs of two candidate models' answers, 27% biased to the first position and 8% to the second
    # (rmd.py teacher-sim --stats), close to what Zheng et al. 2023 (MT-Bench, Table 2) report for GPT-4: 65%
    # consistent, 30% first, 5% second (Claude-v1: 24% consistent, GPT-3.5: 46%). Wang et al. 2023 ("Large
    # Language Models are not Fair Evaluators") likewise find that swapping the order flips a large share of
    # GPT-4's verdicts. All these figures are approximate and come from open-ended questions.
    position_bias: float = 0.6
    # Verbosity bias, in score points for the longest/fanciest answer (scaled by fanciness in [0, 1]). 0.8 makes
    # the fancier of two equally correct answers win ~64% of decided verdicts (--stats), like Dubois et al. 2024
    # (length-controlled AlpacaEval: asking GPT-4 to be verbose raised its win rate against itself from 50% to
    # about 64%). Zheng et al. 2023 found GPT-4 fooled by a padded "repetitive list" answer in ~9% of cases,
    # GPT-3.5 and Claude-v1 in ~91%. Approximate.
    verbosity_bias: float = 0.8
    score_noise: float = 1.0     # std of the Gaussian noise on each annotation score (then rounded to 1-10)
    rescore_noise: float = 0.5   # std on the anchored re-score: one answer against a stated anchor is steadier
    malformed_rate: float = 0.03  # P(an annotate reply ignores the format); an assumption, no published figure
    refine_miss_rate: float = 0.05  # P(refine misses the error and returns the answer unchanged); assumption
    refine_drift_rate: float = 0.1  # P(refine also rewords more than it must); assumption
    # Restyle (style-equivalence pairs): the teacher rewrites an answer in another style, keeping its content.
    # Rewrites are not always faithful: style-transfer and paraphrase outputs are known to lose or change content now
    # and then (e.g. Krishna et al. 2020, "Reformulating Unsupervised Style Transfer as Paraphrase Generation").
    # 0.05 is an assumption of the same size as refine_miss_rate, not a measured figure.
    restyle_drift_rate: float = 0.05  # P(the rewrite also changes the answer's value: a margin-0 pair that lies)
    # Restyle check: asked whether a rewrite keeps its original's content, the teacher compares the two answers' values
    # and gives the wrong verdict with this probability, either way. An assumption of the size of the other flaws, not
    # a measured figure: comparing two short answers is easier than judging which one is right.
    check_error_rate: float = 0.05  # P(the restyle check's verdict on a rewrite is wrong); assumption
    http_error_rate: float = 0.0  # P(the first try of a request gets HTTP 429/500): exercises the client's retries
    # Flaws of real teachers that the pipeline must handle (off by default: the demo's numbers stay as measured).
    refusal_rate: float = 0.0     # P(the teacher declines a prompt instead of answering: its refusal is its y_T)
    commentary_rate: float = 0.0  # P(a refine/restyle reply wraps the answer in a lead-in line and a trailing note)

    def skill_list(self):
        skills = [float(s) for s in self.skills.split(",")]
        if len(skills) != len(STYLES):
            raise ValueError(f"WorldConfig.skills: need {len(STYLES)} comma-separated values (for {STYLES}), "
                             f"got {self.skills!r}")
        return skills


STYLES = ("terse", "plain", "padded", "markdown")
TEACHER_MODEL = "sim-teacher"
CANDIDATE_MODELS = tuple(f"sim-{style}" for style in STYLES)  # generate with one of these: a candidate's answer

# -----------------------------------------------------------------------------
# tasks

CAPITALS = [  # (country, capital, a plausible wrong answer: the big city people confuse with the capital)
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"), ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
    ("Brazil", "Brasilia", "Rio"), ("Turkey", "Ankara", "Istanbul"), ("India", "Delhi", "Mumbai"),
    ("China", "Beijing", "Shanghai"), ("Germany", "Berlin", "Munich"), ("Egypt", "Cairo", "Giza"),
    ("Kenya", "Nairobi", "Mombasa"), ("Peru", "Lima", "Cusco"), ("Chile", "Santiago", "Valparaiso"),
    ("Norway", "Oslo", "Bergen"), ("Poland", "Warsaw", "Krakow"), ("Greece", "Athens", "Sparta"),
    ("Russia", "Moscow", "Kazan"), ("Mexico", "Mexico City", "Cancun"), ("Cuba", "Havana", "Varadero"),
    ("Iran", "Tehran", "Isfahan"), ("Nigeria", "Abuja", "Lagos"), ("Vietnam", "Hanoi", "Saigon"),
]
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "red", "sky", "fox", "owl", "ant", "bee",
         "car", "bus", "tea", "egg", "ice", "jam", "key", "leg", "net", "oak", "pig", "rat", "toy", "van",
         "web", "zoo", "bird", "fish", "lamp", "rock", "tree", "wind", "star", "moon", "frog", "milk", "door",
         "gold", "king", "lake", "nose", "park", "rain", "ship", "wolf", "apple", "bread", "chair", "grape",
         "horse", "lemon", "mouse", "plant", "river", "snake", "table", "tiger", "water", "garden", "rabbit",
         "pencil", "orange", "window", "yellow", "monkey", "basket"]

# Each family: prompt template, plain-statement and explanation sentences with the answer slot {v}.
FAMILIES = {
    "add": dict(prompt="What is {a} + {b}?", plain="{a} + {b} = {v}.",
                explain=["Adding {a} and {b} gives {v}.", "{a} plus {b} makes {v}."]),
    "capital": dict(prompt="What is the capital of {c}?", plain="The capital of {c} is {v}.",
                    explain=["The capital city of {c} is {v}.", "{c} has its government in {v}."]),
    "upper": dict(prompt="Write '{w}' in capital letters.", plain="In capitals: {v}.",
                  explain=["Writing '{w}' in capital letters gives {v}.", "Each letter of '{w}' in upper case: {v}."]),
    "reverse": dict(prompt="Reverse the word '{w}'.", plain="Reversed: {v}.",
                    explain=["Reading '{w}' backwards gives {v}.", "Spelled from the end, '{w}' is {v}."]),
    "count": dict(prompt="How many letters are in '{w}'?", plain="'{w}' has {v} letters.",
                  explain=["The word '{w}' has {v} letters.", "Counting the letters of '{w}' gives {v}."]),
}
# Style wrappers around an explanation {e} that already contains the answer, and the answer {v} itself.
STYLE_TEMPLATES = {
    "terse": ["{v}"],
    "plain": ["{p}", "{e}"],
    "padded": ["Great question! {e} So the answer is {v}. Hope this helps!",
               "Sure! Let me think. {e} The final answer is {v}. Happy to help!"],
    "markdown": ["**Answer:** {v}\n\n- {e}\n- Final: **{v}**",
                 "## Answer\n\n1. {e}\n2. **Result:** `{v}`"],
}
TEACHER_TEMPLATE = "{e} The answer is {v}."   # the teacher's own neutral style (generate)


@dataclass(frozen=True)
class Task:
    family: str
    slots: tuple     # sorted (name, value) pairs that fill the prompt
    answer: str

    @property
    def prompt(self):
        return FAMILIES[self.family]["prompt"].format(**dict(self.slots))


def all_tasks(cfg):
    """The whole task universe, in a fixed order."""
    tasks = []
    for a in range(cfg.max_operand + 1):
        for b in range(cfg.max_operand + 1):
            tasks.append(Task("add", (("a", a), ("b", b)), str(a + b)))
    for country, capital, _ in CAPITALS:
        tasks.append(Task("capital", (("c", country),), capital))
    for w in WORDS:
        tasks.append(Task("upper", (("w", w),), w.upper()))
        if len(w) <= 5:
            tasks.append(Task("reverse", (("w", w),), w[::-1]))
        tasks.append(Task("count", (("w", w),), str(len(w))))
    return tasks


def split_tasks(cfg):
    """(distill tasks, held-out tasks): a fixed share of each family except capital is held out for the test splits
    (normal, hard, mirror, best-of-N); see select_tasks for the valid split's."""
    train, heldout, _ = task_groups(cfg)
    return train, heldout


def select_tasks(cfg):
    """The valid split's tasks: held out from distill and from the test splits alike."""
    return task_groups(cfg)[2]


def task_groups(cfg):
    """(distill, test, select) tasks. The test tasks are drawn first, with the draws they always had; the select
    tasks come out of the rest by a draw of their own, so the test splits ask what they asked before."""
    rng, pick = random.Random(f"split-{cfg.seed}"), random.Random(f"select-{cfg.seed}")
    train, heldout, select = [], [], []
    for t in all_tasks(cfg):
        if t.family != "capital" and rng.random() < cfg.heldout_frac:
            heldout.append(t)
        elif t.family != "capital" and pick.random() < cfg.select_frac:
            select.append(t)
        else:
            train.append(t)
    if cfg.heldout_frac <= 0:
        heldout = list(train)
    return train, heldout, select or list(train)


_PROMPT_RES = [(fam, re.compile(re.escape(spec["prompt"]).replace(r"\{a\}", r"(?P<a>\d+)")
                                .replace(r"\{b\}", r"(?P<b>\d+)").replace(r"\{c\}", r"(?P<c>[A-Za-z ]+)")
                                .replace(r"\{w\}", r"(?P<w>[a-z]+)")))
               for fam, spec in FAMILIES.items()]


def task_from_prompt(prompt):
    """The world task a prompt asks, or None. Stateless: the prompt text is parsed back."""
    prompt = prompt.strip()
    for fam, rx in _PROMPT_RES:
        m = rx.fullmatch(prompt)
        if not m:
            continue
        g = m.groupdict()
        if fam == "add":
            a, b = int(g["a"]), int(g["b"])
            return Task(fam, (("a", a), ("b", b)), str(a + b))
        if fam == "capital":
            cap = {c: k for c, k, _ in CAPITALS}.get(g["c"])
            return Task(fam, (("c", g["c"]),), cap) if cap else None
        w = g["w"]
        return Task(fam, (("w", w),), {"upper": w.upper(), "reverse": w[::-1], "count": str(len(w))}[fam])
    return None

# -----------------------------------------------------------------------------
# answers: rendering, parsing back, true quality


def render(task, value, style, variant=0):
    spec, slots = FAMILIES[task.family], dict(task.slots)
    n_explain = len(spec["explain"])
    e = spec["explain"][variant % n_explain].format(v=value, **slots)
    p = spec["plain"].format(v=value, **slots)
    templates = [TEACHER_TEMPLATE] if style == "teacher" else STYLE_TEMPLATES[style]
    return templates[(variant // n_explain) % len(templates)].format(e=e, p=p, v=value)


def _n_variants(task, style):
    n_templates = 1 if style == "teacher" else len(STYLE_TEMPLATES[style])
    return len(FAMILIES[task.family]["explain"]) * n_templates


def _variants(task):
    for style in ("markdown", "padded", "teacher", "plain", "terse"):  # terse ("{v}") matches anything: last
        for variant in range(_n_variants(task, style)):
            yield style, variant


_SENTINEL = "\x00V\x00"


@functools.lru_cache(maxsize=4096)
def _answer_patterns(task):
    patterns = []
    for style, variant in _variants(task):
        parts = render(task, _SENTINEL, style, variant).split(_SENTINEL)
        pattern = re.escape(parts[0]) + "".join(
            ("(?P<v>.+?)" if i == 0 else "(?P=v)") + re.escape(part) for i, part in enumerate(parts[1:]))
        patterns.append((re.compile(pattern, flags=re.S), style, variant))
    return patterns


def parse_answer(task, text):
    """(value, style, variant) of an answer written in one of the world's templates, or None."""
    text = text.strip()
    for pattern, style, variant in _answer_patterns(task):
        m = pattern.fullmatch(text)
        if m:
            return m.group("v"), style, variant
    return None


def value_quality(task, value):
    """True quality in [0, 1] of an answer value: 1 if right, partial credit for near misses."""
    value, answer = value.strip(), task.answer
    if value == answer:
        return 1.0
    if task.family in ("add", "count"):
        return 0.3 if value.lstrip("-").isdigit() and abs(int(value) - int(answer)) == 1 else 0.0
    if task.family == "capital":
        return 0.0
    same = sum(x == y for x, y in zip(value, answer)) / max(len(value), len(answer))
    return 0.3 * same  # the right letters in the right places earn some credit, never a pass


def true_quality(task, text):
    """True quality in [0, 1] of any answer text. World templates are parsed back exactly; other text is correct
    iff the right answer appears in it as a whole token (and no other answer value is claimed)."""
    parsed = parse_answer(task, text)
    if parsed is not None:
        return value_quality(task, parsed[0])
    return 1.0 if re.search(r"(?<![\w])" + re.escape(task.answer) + r"(?![\w])", text) else 0.0


def true_score(task, text):
    return 1.0 + 9.0 * true_quality(task, text)


def fanciness(text):
    """0 for a bare answer, 1 for a long markdown one: what verbosity-biased judges reward."""
    markdown = any(m in text for m in ("**", "##", "\n- ", "\n1. ", "`", "> "))
    return min(1.0, len(text) / 100.0) * 0.6 + (0.4 if markdown else 0.0)


def wrong_value(task, rng):
    """A candidate model's mistake: near misses more often than wild guesses, as with real models."""
    a = task.answer
    if task.family in ("add", "count"):
        n = int(a)
        if rng.random() < 0.6:
            return str(n + 1 if (rng.random() < 0.5 or n == 0) else n - 1)
        return str(rng.choice([x for x in range(0, max(20, n + 5)) if abs(x - n) > 1]))
    if task.family == "capital":
        country = dict(task.slots)["c"]
        confusable = {c: w for c, _, w in CAPITALS}[country]
        return confusable if rng.random() < 0.7 else rng.choice([k for _, k, _ in CAPITALS if k != a])
    w = dict(task.slots)["w"]
    if task.family == "upper":
        i = rng.randrange(len(a))  # one letter left in lower case
        return a[:i] + a[i].lower() + a[i + 1:] if rng.random() < 0.7 else w
    # reverse: two neighbouring letters swapped, or the word back unchanged
    if rng.random() < 0.7 and len(a) >= 3:
        i = rng.randrange(len(a) - 1)
        s = a[:i] + a[i + 1] + a[i] + a[i + 2:]
        if s != a:
            return s
    return w if w != a else w + w[0]


def candidate_answer(task, model, cfg, rng):
    """(text, value) written by candidate model `model` (an index into STYLES / cfg.skills)."""
    skill = cfg.skill_list()[model]
    style = STYLES[model] if rng.random() < cfg.style_purity else rng.choice(STYLES)
    value = task.answer if rng.random() < skill else wrong_value(task, rng)
    return render(task, value, style, rng.randrange(4)), value

# -----------------------------------------------------------------------------
# the teacher's behaviours (pure functions of the world, the inputs and an rng)


def teacher_belief(task, cfg):
    """The answer the teacher believes, fixed per task: right with P = teacher_skill, else a consistent mistake."""
    rng = random.Random(f"belief-{cfg.seed}-{task.family}-{task.slots}")
    return task.answer if rng.random() < cfg.teacher_skill else wrong_value(task, rng)


def _believed_task(task, cfg):
    return Task(task.family, task.slots, teacher_belief(task, cfg))


def teacher_generate(task, cfg, rng):
    return render(task, teacher_belief(task, cfg), "teacher", rng.randrange(2))


def teacher_judge(task, answer_1, answer_2, cfg, rng, avoid_tie=False):
    """The two 1-10 scores the teacher gives (Assistant 1, Assistant 2), flaws included. Asked to avoid a tie,
    it separates equal scores in the direction of its unrounded judgment."""
    believed = _believed_task(task, cfg) if task else None
    raw = []
    for pos, ans in enumerate((answer_1, answer_2)):
        q = true_quality(believed, ans) if believed else 0.5  # a question outside the world: no known answer
        s = 3.0 + 5.0 * q + cfg.verbosity_bias * fanciness(ans)
        raw.append(s + (cfg.position_bias if pos == 0 else 0.0) + rng.gauss(0.0, cfg.score_noise))
    scores = [int(min(10, max(1, round(s)))) for s in raw]
    if avoid_tie and scores[0] == scores[1] and raw[0] != raw[1]:
        hi = 0 if raw[0] > raw[1] else 1
        if scores[hi] < 10:
            scores[hi] += 1
        else:
            scores[1 - hi] -= 1
    return scores


def teacher_refine(task, rejected, cfg, rng):
    """(diagnosis, refined answer): the wrong value fixed in place, wording and style kept."""
    believed = _believed_task(task, cfg)
    parsed = parse_answer(task, rejected)
    if parsed is None:  # not a world answer: the teacher can only replace it by its own
        return "The answer does not address the question clearly.", teacher_generate(task, cfg, rng)
    value, style, variant = parsed
    if value == believed.answer or rng.random() < cfg.refine_miss_rate:
        return "The non-preferred answer is already correct; it needs no change.", rejected
    if style != "terse" and rng.random() < cfg.refine_drift_rate:
        variant += 1  # rewords more than it must
    diagnosis = (f"The non-preferred answer gives {value}, but the correct answer is {believed.answer}. "
                 f"Replacing {value} by {believed.answer} fixes it; nothing else needs to change.")
    return diagnosis, render(task, believed.answer, style, variant)


WORLD_STYLE = {"terse": "terse", "plain": "plain", "chatty": "padded", "markdown": "markdown"}  # restyle target -> world


def teacher_restyle(task, answer, target, cfg, rng):
    """The answer rewritten in world style `target`, content kept (except with P = restyle_drift_rate). A text the
    teacher cannot read as a world answer comes back unchanged (the pipeline drops unchanged rewrites)."""
    parsed = parse_answer(task, answer)
    if parsed is None:
        return answer
    value, style, variant = parsed
    if rng.random() < cfg.restyle_drift_rate:
        value = wrong_value(task, rng) if value == task.answer else task.answer
    return render(task, value, target, rng.randrange(4))


def teacher_check(task, original, rewritten, cfg, rng):
    """Does `rewritten` keep `original`'s content? The teacher compares the two answers' values (parse_answer,
    whitespace ignored). A text in none of the world's templates reads as a terse answer whose value is all of it,
    so it keeps the content only if it is the same text but for whitespace; so does any text when the question is
    outside the world (task None). The verdict is wrong with P = check_error_rate, either way."""
    def content(text):
        parsed = parse_answer(task, text) if task else None
        return " ".join((parsed[0] if parsed else text).split())
    return (content(original) == content(rewritten)) != (rng.random() < cfg.check_error_rate)


def teacher_rescore(task, anchor_score, rejected, refined, cfg, rng):
    """The refined answer's score, anchored on the stated score of the answer it was made from."""
    believed = _believed_task(task, cfg)
    gain = 5.0 * (true_quality(believed, refined) - true_quality(believed, rejected))
    gain += cfg.verbosity_bias * (fanciness(refined) - fanciness(rejected))
    s = anchor_score + gain + rng.gauss(0.0, cfg.rescore_noise)
    return int(min(10, max(1, round(s))))

# -----------------------------------------------------------------------------
# built-in data: the default distill input, truth-labelled evaluation splits, the best-of-N set


def _pool_pair(task, cfg, rng):
    m1, m2 = rng.sample(range(len(STYLES)), 2)
    return candidate_answer(task, m1, cfg, rng)[0], candidate_answer(task, m2, cfg, rng)[0]


def distill_rows(cfg):
    """The default distill input: {id, prompt, responses: [a, b]} from two different candidate models."""
    rng, (tasks, _) = random.Random(f"distill-{cfg.seed}"), split_tasks(cfg)
    return [{"id": f"sim-{cfg.seed}-{i}", "prompt": t.prompt, "responses": list(_pool_pair(t, cfg, rng))}
            for i, t in enumerate(rng.choice(tasks) for _ in range(cfg.n_distill))]


EVAL_SPLITS = ("normal", "hard", "mirror", "valid")


def eval_pairs(cfg, split):
    """Truth-labelled pairs {prompt, chosen, rejected}. normal: one right and one wrong answer from the natural
    candidate pool; hard: a right terse/plain answer against a wrong, longer, fancier one (RM-Bench's hard);
    mirror: the trap the other way round, a right padded/markdown answer against a wrong terse/plain one (a reward
    model that learned "plain is right" fails it). valid: half normal-like, half hard-like, on tasks of its own
    (select_tasks), for choosing settings without the test splits."""
    tasks = select_tasks(cfg) if split == "valid" else split_tasks(cfg)[1]
    rng, rows = random.Random(f"eval-{split}-{cfg.seed}"), []
    while len(rows) < cfg.n_eval:
        kind = split if split != "valid" else ("normal", "hard")[len(rows) % 2]
        task = rng.choice(tasks)
        if kind in ("hard", "mirror"):
            plain, fancy = ("terse", "plain"), ("padded", "markdown")
            right, wrong = (plain, fancy) if kind == "hard" else (fancy, plain)
            chosen = render(task, task.answer, rng.choice(right), rng.randrange(4))
            rejected = render(task, wrong_value(task, rng), rng.choice(wrong), rng.randrange(4))
        else:
            a, b = _pool_pair(task, cfg, rng)
            qa, qb = true_quality(task, a), true_quality(task, b)
            if (qa == 1.0) == (qb == 1.0):
                continue  # keep pairs whose label is beyond dispute: exactly one correct answer
            chosen, rejected = (a, b) if qa > qb else (b, a)
        rows.append({"id": f"{split}-{cfg.seed}-{len(rows)}", "prompt": task.prompt, "chosen": chosen,
                     "rejected": rejected, **({"kind": kind} if split == "valid" else {})})  # valid: which half
    return rows


def bon_rows(cfg):
    """Best-of-N set: held-out prompts, bon_n candidates each (random candidate models), with true quality."""
    _, heldout = split_tasks(cfg)
    rng, rows = random.Random(f"bon-{cfg.seed}"), []
    for i in range(cfg.n_bon):
        task = rng.choice(heldout)
        answers = [candidate_answer(task, rng.randrange(len(STYLES)), cfg, rng)[0] for _ in range(cfg.bon_n)]
        rows.append({"id": f"bon-{cfg.seed}-{i}", "prompt": task.prompt, "responses": answers,
                     "true_quality": [true_quality(task, a) for a in answers]})
    return rows


def write_builtin_data(out_dir, cfg=None):
    """Write distill input, eval splits (EVAL_SPLITS) and the best-of-N set; returns {name: path}."""
    cfg = cfg or WorldConfig()
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("distill", *EVAL_SPLITS, "bon")}
    write_jsonl(paths["distill"], distill_rows(cfg))
    for split in EVAL_SPLITS:
        write_jsonl(paths[split], eval_pairs(cfg, split))
    write_jsonl(paths["bon"], bon_rows(cfg))
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    return paths


def world_corpus(cfg):
    """The student's pretraining text: every task of the world (held-out ones too: a real student knows facts no
    preference pair mentions) with its correct answer in every candidate style and the teacher's. Never the
    preference pairs or evaluation pairs themselves, and no wrong answer. Returns [(prompt, answer)] in a fixed order."""
    docs = []
    for task in all_tasks(cfg):
        seen = set()
        for style in STYLES + ("teacher",):
            for variant in range(_n_variants(task, style)):
                answer = render(task, task.answer, style, variant)
                if answer not in seen:
                    seen.add(answer)
                    docs.append((task.prompt, answer))
    return docs


def teacher_judge_accuracy(pairs, cfg):
    """The simulated teacher's own accuracy as a judge: both orders, scores averaged, a tie counts as wrong."""
    right = 0
    for row in pairs:
        task = task_from_prompt(row["prompt"])
        rng = random.Random(f"judge-{cfg.seed}-{row['id']}")
        c1, r1 = teacher_judge(task, row["chosen"], row["rejected"], cfg, rng)
        r2, c2 = teacher_judge(task, row["rejected"], row["chosen"], cfg, rng)
        right += (c1 + c2) > (r1 + r2)
    return right / max(1, len(pairs))


def bias_stats(cfg, n=4000):
    """The teacher's measured biases, to compare with the figures WorldConfig cites."""
    rng, tasks = random.Random(f"stats-{cfg.seed}"), all_tasks(cfg)
    consistent = first = second = 0
    fancy_wins = decided = 0
    for _ in range(n):
        task = rng.choice(tasks)
        # position: two candidate models' answers to the same question, as MT-Bench's pairs are
        a, b = _pool_pair(task, cfg, rng)
        s1 = teacher_judge(task, a, b, cfg, rng)
        s2 = teacher_judge(task, b, a, cfg, rng)
        v1, v2 = (s1[0] > s1[1]) - (s1[0] < s1[1]), (s2[1] > s2[0]) - (s2[1] < s2[0])  # +1: a wins
        consistent += v1 == v2
        first += v1 > v2
        second += v1 < v2
        # verbosity: a right plain/terse answer against the same right answer padded or in markdown
        plain = render(task, task.answer, rng.choice(("terse", "plain")), rng.randrange(4))
        fancy = render(task, task.answer, rng.choice(("padded", "markdown")), rng.randrange(4))
        order = rng.random() < 0.5
        s = teacher_judge(task, *((fancy, plain) if order else (plain, fancy)), cfg, rng)
        f, p = (s[0], s[1]) if order else (s[1], s[0])
        decided += f != p
        fancy_wins += f > p
    return {"order_consistent": consistent / n, "biased_to_first": first / n, "biased_to_second": second / n,
            "fancier_wins_decided": fancy_wins / max(1, decided), "tie_rate_fancy_vs_plain": 1 - decided / n}
