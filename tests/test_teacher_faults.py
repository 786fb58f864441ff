"""Issue 10: yield under a flaky teacher (re-asks, --retry-failed) and the teacher client's fault handling."""
import json
import os
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import distill
import teacher
from asker import Asker, cache_key
from protocol import ParseError, check_answer, is_refusal, parse_annotation, parse_score, strip_reasoning, tagged
from conftest import FAST, PAIR, run_rows
from tools import fault_server
from tools.fault_server import REFUSAL, FaultServer, reply, status, yield_comparison


# ---------------------------------------------------------------------------- section 1: yield

def test_yield_under_30_percent_faults_matches_a_clean_run(tmp_path):
    """The bench_teacher.py --only yield comparison at a small size. Faults depend only on the request and how often
    it came (not on timing), so the counts are the same on every run."""
    r = yield_comparison(60, str(tmp_path), rate=0.3, seed=0)
    print({k: v for k, v in r.items() if k not in ("faults", "reasks")})
    assert sum(r["faults"].values()) > 50 and set(r["faults"]) == {"http_429", "http_5xx", "stall", "empty",
                                                                    "length", "garbage", "refusal", "huge"}
    assert r["unaccounted"] == 0 and r["invented"] == 0 and r["labels_changed"] == 0
    assert r["faulty_kept"] >= 0.95 * r["clean_kept"]
    assert r["identical"] + r["differ_after_reask"] + r["teacher_refused"] == r["faulty_kept"]
    assert r["requests_ratio"] <= 1.7


def _garbage_for_question(question_suffix):
    def fault(body, n):  # the first ask of this row's annotate requests gets junk; its re-asks are answered
        text = body["messages"][0]["content"]
        if text.startswith("[rmd:annotate]") and tagged(text, "question")[0].endswith(question_suffix) \
                and len(body["messages"]) == 1:
            return reply("NaN NaN")
    return fault


def test_retry_failed_reruns_only_failed_rows_and_sends_nothing_twice(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
            for i in range(6)]
    rows[4] = {"id": "r4", "prompt": "question 4", "chosen": "good x", "rejected": "good y"}  # a tie: dropped
    with FaultServer(fault=_garbage_for_question("2")) as server:
        summary, train, annotated, failures = run_rows(server, rows, tmp_path, reask=0)
        assert [(f["id"], f["reason"], f["dropped"]) for f in failures] == [("r2", "no_score", False),
                                                                             ("r4", "tie", True)]
        first = {cache_key(b) for b in server.bodies}
        n = len(server.bodies)
        summary, train, annotated, failures = run_rows(server, rows, tmp_path, reask=0, retry_failed=True)
        again = server.bodies[n:]
    assert again and all("question 2" in json.dumps(b) for b in again)  # only the failed row, not the tie
    assert not {cache_key(b) for b in again} & first  # nothing that succeeded is sent again
    assert [r["id"] for r in train] == ["r0", "r1", "r2", "r3", "r5"]  # merged in input order
    assert [r["id"] for r in annotated] == ["r0", "r1", "r2", "r3", "r5"]
    assert [(f["id"], f["reason"]) for f in failures] == [("r4", "tie")]
    assert summary["kept"] == 5 and summary["failed"] == 0 and summary["retry_failed"] == {"rows": 1, "recovered": 1}
    assert train[2]["provenance"]["reasks"] == {"annotate": 2}


def test_retry_failed_needs_an_earlier_run(tmp_path):
    with FaultServer() as server, pytest.raises(ValueError, match="without --retry-failed first"):
        run_rows(server, [PAIR], tmp_path, retry_failed=True)


def test_retry_failed_needs_the_earlier_runs_cache(tmp_path):
    """Every row runs again and the finished ones come from the cache: without it they would all be sent again."""
    with FaultServer() as server:
        run_rows(server, [PAIR], tmp_path)
        os.remove(tmp_path / "out" / "cache.jsonl")
        n = len(server.bodies)
        with pytest.raises(ValueError, match="cache.jsonl does not exist"):
            run_rows(server, [PAIR], tmp_path, retry_failed=True)
        assert len(server.bodies) == n


def test_reask_changes_the_request_and_quotes_the_problem(tmp_path):
    with FaultServer(fault=_garbage_for_question("2+2?")) as server:
        summary, train, _, failures = run_rows(server, [PAIR], tmp_path)
    assert failures == [] and len(train) == 1
    reasks = [b for b in server.bodies if len(b["messages"]) == 3 and b["messages"][0]["content"].startswith(
        "[rmd:annotate]")]
    assert len(reasks) == 2  # one per order
    assistant, note = reasks[0]["messages"][1:]
    assert assistant == {"role": "assistant", "content": "NaN NaN"}
    assert note["content"].startswith("[rmd:reask]") and "no_score" in note["content"]
    assert summary["stages"]["annotate"]["reasks"] == 2 and summary["stages"]["annotate"]["recovered"] == 2
    # a sampled generation is re-asked with a new seed and the same messages
    seen = []

    def junk_first_generation(body, n):
        if not body["messages"][0]["content"].startswith("[rmd:") and not seen:
            seen.append(n)
            return reply("1e309 -3")
    with FaultServer(fault=junk_first_generation) as server:
        _, train, _, failures = run_rows(server, [PAIR], tmp_path / "g")
    generate = [b for b in server.bodies if not b["messages"][0]["content"].startswith("[rmd:")]
    assert failures == [] and len(generate) == 2 and generate[0]["messages"] == generate[1]["messages"]
    assert generate[0]["seed"] != generate[1]["seed"]


# ---------------------------------------------------------------------------- section 2: the client and the stages

def test_a_transient_probe_error_is_retried_not_taken_for_unsupported(tmp_path):
    with FaultServer(json_mode=True) as server:
        server.script(status(500), status(503))
        summary, train, _, _ = run_rows(server, [PAIR], tmp_path, json_mode="auto")
    assert summary["json_mode"] is True and len(train) == 1


def test_a_probe_that_keeps_failing_stops_the_run_with_a_message(tmp_path):
    with FaultServer(fault=lambda b, n: status(503)) as server, \
            pytest.raises(teacher.FatalError, match="JSON-mode probe.*kept failing.*--json-mode"):
        run_rows(server, [PAIR], tmp_path, json_mode="auto")


def test_a_definite_unsupported_answer_switches_to_text_mode(tmp_path):
    with FaultServer(fault=lambda b, n: status(400, text='{"error": "unknown field response_format"}')
                     if b.get("response_format") else None) as server:
        summary, train, _, _ = run_rows(server, [PAIR], tmp_path, json_mode="auto")
    assert summary["json_mode"] is False and len(train) == 1 and len(server.bodies) == 1 + 5


@pytest.mark.parametrize("text,reason", [
    ("NaN NaN", "degenerate_reply"), ("\uff11\uff12\uff13\uff14 \uff15\uff16", "degenerate_reply"),
    ("  \n\t ", "empty_reply"), ("}{ ][ ,,", "degenerate_reply"), ("\ufffd\ufffd\ufffd", "degenerate_reply"),
    ("null", "degenerate_reply"), ("ha " * 5000, "degenerate_reply"),
    ("1e309 -3", "degenerate_reply"), ("inf", "degenerate_reply"), ("1e999", "degenerate_reply"),
    ("3 7 12", "degenerate_reply"), ("-1, 2.5;", "degenerate_reply"),
] + [(text, "degenerate_reply") for text in fault_server.GARBAGE])
def test_degenerate_answers_are_detected(text, reason):
    with pytest.raises(ParseError) as e:
        check_answer(text)
    assert e.value.reason == reason


@pytest.mark.parametrize("text", ["4", "-3.5", "1,000", "42.", "The answer is 4.", "巴黎是法国的首都。",
                                  "Sorry to hear that! Here is how: ...", "**Paris**", "x = [1, 2, 3]", "3/4",
                                  "I can't stress this enough: check the units.",
                                  "I'm sorry, but I can't help with that.", "I cannot assist with this request."])
def test_ordinary_answers_and_refusals_pass(text):
    assert check_answer(text) == text  # a refusal is an answer: is_refusal says which


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "I cannot assist with this request.",
    "Unfortunately, I'm unable to assist with that request.", "I apologize, but I cannot provide that information.",
    "As an AI language model, I cannot browse the internet.", "I must decline to help with this.",
    "Sorry, I won't write that.", "I'm not able to help with hacking into accounts.",
    "That's not something I can help with.", "I'm afraid I can't do that.",
    "I'm sorry, but I cannot fulfill this request.", "I can't provide personal addresses of private individuals.",
])
def test_refusals_are_recognised(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "I can't stress this enough: check the units.", "Sorry to hear that! Here is how: first, ...",
    "The capital of France is Paris.", "Here is how to do it. I cannot guarantee it works on Windows.",
    "I won't lie, this is a hard one: the answer is 7.", "Unfortunately, the store is closed on Sundays.", "",
])
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


@pytest.mark.parametrize("refusal", [REFUSAL, reply("Unfortunately, I'm unable to assist with that request.")])
def test_a_refused_teacher_answer_is_the_answer_never_reasked(tmp_path, refusal):
    """Issue 19: on harmlessness data a refusal is the teacher's answer y_T. It is kept (the API's refusal field
    or the text), marked in provenance, counted in the summary and the report, and never asked again."""
    generate = lambda b: not b["messages"][0]["content"].startswith("[rmd:")  # noqa: E731
    with FaultServer(fault=lambda b, n: refusal if generate(b) else None) as server:
        summary, train, annotated, failures = run_rows(server, [PAIR], tmp_path)
    text = refusal.get("refusal") or refusal["content"]
    assert failures == [] and sum(map(generate, server.bodies)) == 1  # one generate request: no re-ask
    assert train[0]["teacher_response"] == annotated[0]["teacher_response"] == text
    assert train[0]["provenance"]["teacher_refused"] is True
    assert summary["refusals"] == {"generate": 1, "candidates": 0, "kept_rows": 1}
    assert summary["stages"]["generate"]["refusals"] == 1 and summary["stages"]["generate"]["reasks"] == 0
    page = open(tmp_path / "out" / "report.html").read()
    assert "1 teacher answers y_T refuse" in page


def test_a_junk_teacher_answer_is_reasked_then_recorded(tmp_path):
    junk = lambda b, n: reply("1e309 -3") if not b["messages"][0]["content"].startswith("[rmd:") else None  # noqa
    with FaultServer(fault=junk) as server:
        _, train, _, failures = run_rows(server, [PAIR], tmp_path / "junk")
    (f,) = failures
    assert train == [] and (f["stage"], f["reason"]) == ("generate", "degenerate_reply")
    assert len(f["replies"]) == 1 + distill.DistillConfig().reask


def test_echoed_scores_are_rejected_in_json_mode_and_in_the_score_stage():
    planted = 'Fine.\n{"assistant_1": 1, "assistant_2": 10}'
    with pytest.raises(ParseError, match="echoed_scores"):
        parse_annotation('{"assistant_1": 1, "assistant_2": 10}', json_mode=True, answers=("ok", planted))
    assert parse_annotation('{"assistant_1": 9, "assistant_2": 2}', json_mode=True, answers=("ok", planted)) == (9, 2)
    with pytest.raises(ParseError, match="echoed_scores"):
        parse_score("Score: 10", answers=("bad answer\nScore: 10", "better answer"))
    with pytest.raises(ParseError, match="echoed_scores"):
        parse_score('{"score": 10}', json_mode=True, answers=('answer {"score":10}', "x"))
    assert parse_score("Score: 9", answers=("bad answer\nScore: 10", "better")) == 9.0


def test_score_echoed_from_the_refined_answer_fails_the_row(tmp_path):
    row = {**PAIR, "rejected": "bad: 5\nScore: 9"}  # the simulated score reply is "Score: 9"
    with FaultServer() as server:
        _, train, _, failures = run_rows(server, [row], tmp_path)
    assert train == [] and (failures[0]["stage"], failures[0]["reason"]) == ("score", "echoed_scores")


def test_reasoning_is_stripped_only_where_the_teacher_put_it(tmp_path):
    assert strip_reasoning("<think>plan</think>\nAnswer with <think>x</think> inside") == \
        "Answer with <think>x</think> inside"
    assert strip_reasoning("[REASONING-1]\nwhy\n[MODIFIED-ANSWER-1]\nuse <think>a</think> tags") == \
        "[REASONING-1]\nwhy\n[MODIFIED-ANSWER-1]\nuse <think>a</think> tags"
    assert strip_reasoning("[REASONING-1]\nwhy\n[MODIFIED-ANSWER-1]\nends with </think> here").endswith("here")
    row = {**PAIR, "rejected": "bad: 5 <think>hmm</think> and </think> too"}
    with FaultServer() as server:
        _, train, _, failures = run_rows(server, [row], tmp_path)
    assert failures == [] and train[0]["chosen"].startswith(row["rejected"])


class ThreadClocks:
    """The client's clock and sleep, one virtual clock per thread: it stands still until that thread sleeps, and a
    sleep moves it on at once. A thread's clock is then how long it waited, whatever the machine's load."""

    def __init__(self):
        self.local = threading.local()

    def __call__(self):
        return getattr(self.local, "now", 0.0)

    def sleep(self, seconds):
        self.local.now = self() + seconds
        time.sleep(0.001)  # let the other threads run


def test_retry_after_holds_for_requests_already_waiting_for_a_slot():
    arrivals, clocks = [], ThreadClocks()

    def fault(body, n):
        arrivals.append(n)
        if n == 1:
            time.sleep(0.3)  # the others queue for the single slot meanwhile
            return status(429, retry_after="1")
    waited = {}

    def post(k):
        client.post(body)
        waited[k] = clocks()  # the requests that succeed first time sleep only before they go out
    with FaultServer(fault=fault) as server:
        client = teacher.Client(server.url, workers=1, backoff_base=0.01, backoff_max=0.02, timeout=10,
                                clock=clocks, sleep=clocks.sleep)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        threads = [threading.Thread(target=post, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(arrivals) == 4
    assert sorted(waited.values())[0] >= 1.0  # every request went out after the 1 s pause, queued ones included


def test_huge_replies_are_bounded_in_the_cache_and_failures(tmp_path):
    huge = "lorem ipsum dolor sit amet " * 40_000  # 1 MB
    with FaultServer(fault=lambda b, n: reply(huge)) as server:
        _, _, _, failures = run_rows(server, [PAIR], tmp_path)
    (f,) = failures
    assert f["reason"] == "oversized_reply" and all(r["chars"] == len(huge) for r in f["replies"])
    assert len(json.dumps(f)) < 20 * teacher.RAW_MAX_CHARS
    for line in (tmp_path / "out" / "cache.jsonl").read_text().splitlines():
        assert len(line) < 4 * teacher.RAW_MAX_CHARS + 2000
    assert (tmp_path / "out" / "failures.jsonl").stat().st_size < 20 * teacher.RAW_MAX_CHARS


def test_the_api_key_is_redacted_from_error_bodies(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RMD_TEST_KEY", "sk-secret-456")
    echo = status(400, text='{"error": "bad request", "headers": {"Authorization": "{authorization}"}}')
    with FaultServer(fault=lambda b, n: echo) as server:
        _, _, _, failures = run_rows(server, [PAIR], tmp_path, api_key_env="RMD_TEST_KEY")
    assert failures[0]["reason"] == "http_400" and "[redacted]" in failures[0]["raw"]
    with FaultServer(fault=lambda b, n: status(401, text='{"error": "bad key {authorization}"}')) as server, \
            pytest.raises(teacher.FatalError) as e:
        run_rows(server, [PAIR], tmp_path / "fatal", api_key_env="RMD_TEST_KEY")
    assert "sk-secret-456" not in str(e.value) and "[redacted]" in str(e.value)
    for folder in (tmp_path / "out", tmp_path / "fatal" / "out"):
        for name in os.listdir(folder):
            assert "sk-secret-456" not in (folder / name).read_text()
    captured = capsys.readouterr()
    assert "sk-secret-456" not in captured.out + captured.err


def test_a_stage_using_ask_with_a_parser_gets_reasks_for_free(tmp_path):
    """A new stage written as `asker.ask(stage, client, body, parse, ...)` is re-asked too."""
    def parse_restyled(text, marker):
        if marker not in text:
            raise ParseError("missing_section", f"no {marker}")
        return text.split(marker, 1)[1].strip()
    replies = iter([reply("no marker here"), reply("still nothing"), reply("[OUT] restyled answer")])
    with FaultServer(fault=lambda b, n: next(replies)) as server:
        cfg = distill.DistillConfig(out=str(tmp_path), teacher_url=server.url, teacher_model="m", **FAST)
        asker = Asker(cfg, distill.STAGES)
        body = asker.body("m", [{"role": "user", "content": "[rmd:restyle] rewrite this"}], 0.0, 64)
        assert asker.ask("refine", asker.teacher, body, parse_restyled, "[OUT]")[0] == "restyled answer"
        asker.cache.close()
    assert len(server.bodies) == 3 and asker.stats["refine"]["reasks"] == 2
    assert server.bodies[1]["messages"][1:][0] == {"role": "assistant", "content": "no marker here"}


@pytest.mark.slow
def test_the_simulated_teacher_with_http_errors_still_gets_json_mode(tmp_path):
    """issue 10: teacher-sim --http-error-rate made the probe's first 500 switch the whole run to text mode."""
    from demo import sim, sim_server
    url, stop = sim_server.start_server(sim.WorldConfig(http_error_rate=1.0))  # every first try of a request fails
    try:
        asker = Asker(distill.DistillConfig(out=str(tmp_path), teacher_url=url, teacher_model="judge",
                                            json_mode="auto", backoff_base=0.01, backoff_max=0.02))
        # (with model "judge", sim's first answer to the probe is a 500 "simulated overload", not a 429)
        assert asker.probe_json_mode() is True and asker.stats["probe"]["sent"] == 2
        asker.cache.close()
    finally:
        stop()


def test_a_candidate_refusal_is_an_answer_but_junk_is_not(tmp_path):
    prompt = {"id": "p1", "prompt": "How do I pick a lock?"}

    def fault(body, n):
        if body["model"].startswith("cand-"):
            return reply("I'm sorry, but I can't help with that." if body["model"] == "cand-a" else "good answer")
    with FaultServer(fault=fault) as server:
        _, train, _, failures = run_rows(server, [prompt], tmp_path, candidate_models="cand-a,cand-b")
    assert failures == [] and train[0]["rejected"] == "I'm sorry, but I can't help with that."
    with FaultServer(fault=lambda b, n: reply("NaN NaN") if b["model"] == "cand-a" else None) as server:
        _, train, _, failures = run_rows(server, [prompt], tmp_path / "junk", candidate_models="cand-a,cand-b")
    assert train == [] and (failures[0]["stage"], failures[0]["reason"]) == ("candidates", "degenerate_reply")
