"""The simulated teacher: its world's ground truth, its replies through protocol.py's real parsers, a tiny distill
against it, and a reduced ablation as a smoke test. Accuracy figures live in ablation.py, not here."""
import difflib
import json
import random

import pytest
import requests

import distill
import protocol
from demo import sim, sim_server

CLEAN = dict(teacher_skill=1.0, refine_miss_rate=0.0, refine_drift_rate=0.0, malformed_rate=0.0, check_error_rate=0.0)


@pytest.fixture(scope="module")
def server():
    url, shutdown = sim_server.start_server(sim.WorldConfig(**CLEAN), port=0)
    yield url
    shutdown()


def chat(url, messages, json_mode=False, model=sim.TEACHER_MODEL):
    body = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": 64}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    r = requests.post(url + "/chat/completions", json=body, timeout=10)
    r.raise_for_status()
    return r.json()


# ------------------------------------------------------------------------------------------- the world's truth

def test_prompts_and_answers_parse_back_to_the_truth():
    cfg, rng = sim.WorldConfig(), random.Random(0)
    for task in sim.all_tasks(cfg):
        assert sim.task_from_prompt(task.prompt) == task
        for model in range(len(sim.STYLES)):
            text, value = sim.candidate_answer(task, model, cfg, rng)
            assert sim.parse_answer(task, text)[0] == value
            assert (sim.true_quality(task, text) == 1.0) == (value == task.answer)
        assert sim.true_quality(task, sim.render(task, task.answer, "markdown", 1)) == 1.0
        assert sim.true_quality(task, sim.render(task, sim.wrong_value(task, rng), "padded", 0)) < 1.0


def test_better_models_are_more_often_right_and_fancier():
    cfg, rng = sim.WorldConfig(), random.Random(1)
    tasks = sim.all_tasks(cfg)
    right, fancy = [], []
    for model in range(len(sim.STYLES)):
        picks = [rng.choice(tasks) for _ in range(600)]
        answers = [sim.candidate_answer(t, model, cfg, rng) for t in picks]
        right.append(sum(v == t.answer for (_, v), t in zip(answers, picks)) / len(picks))
        fancy.append(sum(sim.fanciness(text) for text, _ in answers) / len(answers))
    assert right == sorted(right) and fancy == sorted(fancy)


def test_teacher_answers_are_correct():
    cfg, rng = sim.WorldConfig(), random.Random(2)
    tasks = sim.all_tasks(cfg)
    right = [sim.true_quality(t, sim.teacher_generate(t, cfg, rng)) == 1.0 for t in tasks]
    assert sum(right) / len(right) > 0.9
    cfg = sim.WorldConfig(teacher_skill=1.0)
    assert all(sim.true_quality(t, sim.teacher_generate(t, cfg, rng)) == 1.0 for t in tasks)


def test_refine_fixes_the_answer_and_keeps_its_wording():
    cfg, rng = sim.WorldConfig(**CLEAN), random.Random(3)
    for task in sim.all_tasks(cfg)[::3]:
        for style in ("plain", "padded", "markdown"):
            wrong = sim.render(task, sim.wrong_value(task, rng), style, rng.randrange(4))
            diagnosis, refined = sim.teacher_refine(task, wrong, cfg, rng)
            assert sim.true_quality(task, refined) == 1.0, (wrong, refined)
            assert sim.parse_answer(task, refined)[1:] == sim.parse_answer(task, wrong)[1:]  # same style, wording
            assert difflib.SequenceMatcher(None, wrong, refined).ratio() > 0.7
            assert task.answer in diagnosis
        right = sim.render(task, task.answer, "padded", 0)
        assert sim.teacher_refine(task, right, cfg, rng)[1] == right  # nothing to fix: unchanged (filtered later)


def test_rescore_is_anchored_and_follows_the_true_improvement():
    cfg, rng = sim.WorldConfig(**CLEAN), random.Random(4)
    task = sim.task_from_prompt("What is 3 + 4?")
    wrong, right = sim.render(task, "9", "padded", 0), sim.render(task, "7", "padded", 0)
    up = [sim.teacher_rescore(task, 4.0, wrong, right, cfg, rng) for _ in range(200)]
    same = [sim.teacher_rescore(task, 4.0, wrong, wrong, cfg, rng) for _ in range(200)]
    assert 8 <= sum(up) / len(up) <= 10 and abs(sum(same) / len(same) - 4.0) < 0.3


def test_restyle_check_compares_the_values_and_errs_at_its_rate():
    """Issue 23: the sim teacher's restyle check compares the two answers' values, whatever their styles, and gives
    the wrong verdict with P = check_error_rate, either way; a text it cannot read is the same only if equal."""
    task, rng = sim.task_from_prompt("What is 3 + 4?"), random.Random(5)
    kept = [(sim.render(task, v, "plain", 0), sim.render(task, v, "markdown", 1)) for v in ("7", "9")]
    changed = [(sim.render(task, "7", "plain", 0), sim.render(task, "8", "markdown", 1)),
               (sim.render(task, "9", "padded", 1), sim.render(task, "7", "terse", 0))]
    exact = sim.WorldConfig(check_error_rate=0.0)
    assert all(sim.teacher_check(task, a, b, exact, rng) for a, b in kept)
    assert not any(sim.teacher_check(task, a, b, exact, rng) for a, b in changed)
    assert sim.teacher_check(task, "Seven,  I think", "Seven, I think", exact, rng)  # not a world answer: equal
    assert not sim.teacher_check(task, "Seven, I think", "**Seven**, I think", exact, rng)
    assert not sim.teacher_check(None, "a", "b", exact, rng) and sim.teacher_check(None, "a", " a", exact, rng)
    flawed, n = sim.WorldConfig(check_error_rate=0.2), 4000
    wrong = sum(sim.teacher_check(task, *kept[k % 2], flawed, rng) != True for k in range(n // 2)) + sum(  # noqa: E712
        sim.teacher_check(task, *changed[k % 2], flawed, rng) != False for k in range(n // 2))  # noqa: E712
    assert abs(wrong / n - 0.2) < 0.03


@pytest.mark.parametrize("json_mode", [False, True])
def test_restyle_check_replies_parse(server, json_mode):
    question = "What is 3 + 4?"
    task = sim.task_from_prompt(question)
    for original, rewritten, same in [("3 + 4 = 7.", "**Answer:** 7\n\n- 3 plus 4 makes 7.\n- Final: **7**", True),
                                      ("3 + 4 = 7.", "8", False)]:
        assert sim.parse_answer(task, rewritten) is not None
        text = protocol.restyle_check_prompt(question, original, rewritten, json_mode)
        reply = chat(server, [{"role": "user", "content": text}], json_mode)
        assert protocol.parse_restyle_check(reply["choices"][0]["message"]["content"], json_mode) is same


def test_eval_splits_are_labelled_by_truth():
    cfg = sim.WorldConfig(n_eval=200)
    heldout = {t.prompt for t in sim.split_tasks(cfg)[1]}
    for row in sim.eval_pairs(cfg, "hard"):
        task = sim.task_from_prompt(row["prompt"])
        assert sim.true_quality(task, row["chosen"]) == 1.0 > sim.true_quality(task, row["rejected"])
        assert sim.parse_answer(task, row["chosen"])[1] in ("terse", "plain")
        assert sim.parse_answer(task, row["rejected"])[1] in ("padded", "markdown")
        assert len(row["rejected"]) > len(row["chosen"])
        assert sim.fanciness(row["rejected"]) > sim.fanciness(row["chosen"])
    for row in sim.eval_pairs(cfg, "normal"):
        task = sim.task_from_prompt(row["prompt"])
        assert sim.true_quality(task, row["chosen"]) == 1.0 > sim.true_quality(task, row["rejected"])
        assert row["prompt"] in heldout or task.family == "capital"


def test_write_builtin_data(tmp_path):
    cfg = sim.WorldConfig(n_distill=30, n_eval=20, n_bon=5)
    paths = sim.write_builtin_data(str(tmp_path), cfg)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert len(rows["distill"]) == 30 and all(len(r["responses"]) == 2 for r in rows["distill"])
    assert len(rows["bon"]) == 5 and all(len(r["responses"]) == len(r["true_quality"]) == 8 for r in rows["bon"])
    assert sim.write_builtin_data(str(tmp_path / "again"), cfg) and \
        open(paths["hard"]).read() == open(tmp_path / "again" / "hard.jsonl").read()  # seeded: same files


def test_judge_biases_near_the_cited_figures():
    stats = sim.bias_stats(sim.WorldConfig(), n=1500)
    assert 0.55 < stats["order_consistent"] < 0.75 and stats["biased_to_first"] > stats["biased_to_second"]
    assert 0.55 < stats["fancier_wins_decided"] < 0.75


# ------------------------------------------------------------------------------- replies through the real parsers

@pytest.mark.slow
@pytest.mark.parametrize("json_mode", [False, True])
def test_annotate_reply_parses(server, json_mode):
    question = "What is the capital of Australia?"
    a, b = "Canberra", "**Answer:** Sydney\n\n- The capital city of Australia is Sydney.\n- Final: **Sydney**"
    reply = chat(server, [{"role": "user", "content": protocol.annotate_prompt(question, a, b, json_mode)}], json_mode)
    s1, s2 = protocol.parse_annotation(reply["choices"][0]["message"]["content"], json_mode, (a, b))
    assert s1 > s2
    assert reply["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("json_mode", [False, True])
def test_refine_and_score_replies_parse(server, json_mode):
    question, rejected = "Reverse the word 'lamp'.", "Reversed: pmla."
    nonce, text = protocol.refine_prompt(question, "Reading 'lamp' backwards gives pmal. The answer is pmal.", rejected,
                                         json_mode)
    messages = [{"role": "user", "content": text}]
    refine_reply = chat(server, messages, json_mode)["choices"][0]["message"]["content"]
    diagnosis, refined = protocol.parse_refinement(refine_reply, nonce, json_mode)
    assert refined == "Reversed: pmal." and "pmal" in diagnosis
    messages += [{"role": "assistant", "content": refine_reply},
                 {"role": "user", "content": protocol.score_prompt(nonce, 3.5, json_mode)}]
    score = protocol.parse_score(chat(server, messages, json_mode)["choices"][0]["message"]["content"], json_mode)
    assert score >= 6.5


@pytest.mark.slow
def test_generate_teacher_and_candidates(server):
    messages = [{"role": "user", "content": "What is 6 + 7?"}]
    assert chat(server, messages)["choices"][0]["message"]["content"] in (
        "Adding 6 and 7 gives 13. The answer is 13.", "6 plus 7 makes 13. The answer is 13.")
    models = requests.get(server + "/models", timeout=5).json()["data"]
    assert {m["id"] for m in models} == {sim.TEACHER_MODEL, *sim.CANDIDATE_MODELS}
    text = chat(server, messages, model="sim-markdown")["choices"][0]["message"]["content"]
    assert sim.parse_answer(sim.task_from_prompt("What is 6 + 7?"), text) is not None


@pytest.mark.slow
def test_replies_are_deterministic(server):
    body = [{"role": "user", "content": protocol.annotate_prompt("What is 2 + 2?", "4", "5")}]
    assert chat(server, body) == chat(server, body)


@pytest.mark.slow
def test_malformed_replies_fail_the_parser():
    url, shutdown = sim_server.start_server(sim.WorldConfig(malformed_rate=1.0), port=0)
    try:
        reply = chat(url, [{"role": "user", "content": protocol.annotate_prompt("What is 2 + 2?", "4", "5")}])
        with pytest.raises(protocol.ParseError):
            protocol.parse_annotation(reply["choices"][0]["message"]["content"], False, ("4", "5"))
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_distill_end_to_end_with_retries(tmp_path):
    cfg = sim.WorldConfig(n_distill=40, http_error_rate=0.2)
    paths = sim.write_builtin_data(str(tmp_path / "data"), cfg)
    url, shutdown = sim_server.start_server(cfg, port=0)
    try:
        summary = distill.distill(distill.DistillConfig(
            data=paths["distill"], out=str(tmp_path / "distill"), teacher_url=url, teacher_model=sim.TEACHER_MODEL,
            workers=4, backoff_base=0.01, backoff_max=0.05, progress=False))
    finally:
        shutdown()
    assert summary["kept"] > 10
    assert sum(st["sent"] for st in summary["stages"].values()) > sum(
        st["replies"] for st in summary["stages"].values())  # some first tries failed and were retried
    rows = [json.loads(line) for line in open(tmp_path / "distill" / "train.jsonl")]
    by_source = {}
    for row in rows:
        by_source.setdefault(row["provenance"]["source"], []).append(row)
    import train
    from demo import ablation, builtin
    pairs, loss, lm, student, _ = ablation.ARMS[ablation.DEFAULT_ARM]  # what the demo trains is the default arm
    assert set(by_source) == set(ablation.PAIR_SOURCES[pairs]) == {"refined", "restyled", "crossed", "equivalent",
                                                                   "original"}
    assert (builtin.DEMO_TRAIN["model"], loss, lm) == (student, train.TrainConfig().loss,
                                                       train.TrainConfig().lm_weight > 0)
    assert sorted(r["id"] for r in by_source["original"]) == sorted(r["id"] + ":original" for r in by_source["refined"])
    assert len({r["id"] for r in rows}) == len(rows)  # every pair of train.jsonl has its own id
    right = sum(sim.true_quality(sim.task_from_prompt(r["prompt"]), r["chosen"]) >
                sim.true_quality(sim.task_from_prompt(r["prompt"]), r["rejected"]) for r in by_source["original"])
    assert right >= 0.7 * len(by_source["original"])  # refine found y_l wrong: few style-only pairs are left
    originals = {r["chosen"] for r in by_source["refined"]} | {r["rejected"] for r in by_source["refined"]}
    for row in by_source["equivalent"]:  # a restyled y_w* or y_l against itself: margin 0, same content (bar drift)
        assert row["chosen_score"] == row["rejected_score"] and row["chosen"] != row["rejected"]
        assert ":equivalent:" in row["id"] and row["rejected"] in originals
    for row in by_source["restyled"] + by_source["crossed"]:  # the refined pair's margin, some style changed
        assert row["chosen_score"] - row["rejected_score"] > 1
    refined = {r["id"]: r for r in by_source["refined"]}
    sides = {"chosen": 0, "rejected": 0}  # which side of a crossed pair keeps the original style
    for row in by_source["crossed"]:
        base = refined[row["id"].split(":")[0]]
        assert (row["chosen"] == base["chosen"]) != (row["rejected"] == base["rejected"])
        sides["chosen" if row["chosen"] == base["chosen"] else "rejected"] += 1
    assert sides["chosen"] > 0 and sides["rejected"] > 0  # the restyled answer sits on both sides
    same = sum(sim.true_quality(sim.task_from_prompt(r["prompt"]), r["chosen"]) ==
               sim.true_quality(sim.task_from_prompt(r["prompt"]), r["rejected"]) for r in by_source["equivalent"])
    assert same >= 0.8 * len(by_source["equivalent"])  # restyle_drift_rate 0.05 changes a few
    checked = summary["restyle"]["checked"]  # every rewrite that changed anything was checked; a few said changed
    assert summary["stages"]["restyle_check"]["replies"] == checked > 0 and 0 < summary["restyle"]["changed"] < checked
    rows, better = by_source["refined"], 0
    for row in rows:
        task = sim.task_from_prompt(row["prompt"])
        better += sim.true_quality(task, row["chosen"]) > sim.true_quality(task, row["rejected"])
        assert row["chosen_score"] - row["rejected_score"] > 1
    assert better >= 0.9 * len(rows)  # the rest: tasks on which the teacher itself is wrong (teacher_skill)


def test_the_mirror_split_is_the_style_trap_the_other_way_round():
    cfg = sim.WorldConfig(n_eval=100)
    for row in sim.eval_pairs(cfg, "mirror"):
        task = sim.task_from_prompt(row["prompt"])
        assert sim.true_quality(task, row["chosen"]) == 1.0 > sim.true_quality(task, row["rejected"])
        assert sim.parse_answer(task, row["chosen"])[1] in ("padded", "markdown")
        assert sim.parse_answer(task, row["rejected"])[1] in ("terse", "plain")


def test_valid_asks_tasks_of_its_own_and_the_test_tasks_stay_as_they_were():
    cfg = sim.WorldConfig(n_eval=200)
    distill, test, select = (set(t.prompt for t in group) for group in sim.task_groups(cfg))
    assert select and not select & distill and not select & test and not distill & test
    assert {r["prompt"] for r in sim.eval_pairs(cfg, "valid")} <= select
    assert {r["prompt"] for r in sim.distill_rows(cfg)} <= distill
    # the select tasks come out of the distill tasks: the test tasks are those drawn without them
    assert test == {t.prompt for t in sim.split_tasks(sim.WorldConfig(select_frac=0.0))[1]}


@pytest.mark.slow
def test_ablation_smoke(tmp_path):
    from demo import ablation
    results = ablation.main(["--seeds=0", f"--arms=a,{ablation.DEFAULT_ARM}", "--steps=2", "--sweep=0.1",
                             "--batch-size=4", "--n-distill=30", "--n-eval=10", "--n-bon=4", f"--out={tmp_path}"])
    assert set(results) == {"a", ablation.DEFAULT_ARM}
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["default_arm"] == ablation.DEFAULT_ARM
    assert set(saved["arms"][ablation.DEFAULT_ARM][0]) >= {"seed", "normal", "hard", "mirror", "bon", "valid_normal",
                                                          "valid_hard", "valid"}
    for rows in results.values():
        assert all(0.0 <= rows[0][k] <= 1.0 for k in ("normal", "hard", "bon"))
    assert (tmp_path / "table.md").exists()


def test_lm_weight_sweep_takes_the_smallest_weight_within_one_standard_error():
    from demo import ablation
    assert ablation.pick_lm_weight({0.1: 0.730, 1.0: 0.735}, 400) == 0.1  # +0.5 points: SE is 2.2
    assert ablation.pick_lm_weight({0.1: 0.600, 1.0: 0.735}, 400) == 1.0  # +13.5 points: a real difference
    assert ablation.pick_lm_weight({1.0: 0.70, 0.1: 0.70}, 400) == 0.1


@pytest.mark.slow
@pytest.mark.parametrize("json_mode", ["off", "on"])
def test_distill_keeps_refusals_as_answers_and_cuts_commentary(tmp_path, json_mode):
    """Issue 19 through the real protocol: a teacher that refuses some prompts (its refusal is y_T: kept, counted,
    not asked again) and wraps every refined and restyled answer in a lead-in line and a note (cut, in text mode and
    inside JSON values alike)."""
    world = sim.WorldConfig(n_distill=24, refusal_rate=0.3, commentary_rate=1.0)
    paths = sim.write_builtin_data(str(tmp_path / "data"), world)
    url, shutdown = sim_server.start_server(world, port=0)
    try:
        summary = distill.distill(distill.DistillConfig(
            data=paths["distill"], out=str(tmp_path / "distill"), teacher_url=url, teacher_model=sim.TEACHER_MODEL,
            workers=4, progress=False, json_mode=json_mode))
    finally:
        shutdown()
    rows = [json.loads(line) for line in open(tmp_path / "distill" / "train.jsonl")]
    refused = [r for r in rows if r["provenance"]["source"] == "refined" and r["provenance"].get("teacher_refused")]
    assert refused and all(r["teacher_response"] == sim_server.REFUSAL for r in refused)
    assert summary["refusals"]["kept_rows"] == len(refused) <= summary["refusals"]["generate"]
    assert summary["stages"]["generate"]["reasks"] == 0  # a refusal is never asked again
    for r in rows:
        for text in (r["chosen"], r["rejected"]):
            assert sim_server.LEAD_IN not in text and sim_server.NOTE not in text
    assert summary["kept"] > 5 and summary["restyle"]["pairs"] > 0 and summary["edits"]["pairs"] == summary["kept"]
