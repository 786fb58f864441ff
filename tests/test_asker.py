"""asker.py through fault_server.py: a request sent exactly once (the cache: reruns send nothing; what each
entry records), re-asks of a reply that is no answer and the failure that records them, the JSON-mode probe, the
request body, API keys (where each goes, never stored), requests in flight."""
import json
import os
import time

import pytest

import distill
import protocol
import teacher
from asker import cache_key
from conftest import ASKS, PAIR, run_rows
from tools.fault_server import EMPTY_CHOICES, NOT_JSON, REFUSAL, FaultServer, drip, reply, sleep, status


@pytest.mark.parametrize("fault,reason,requests", [
    (status(500), "http_500", 4),                      # 1 + max_retries, then a recorded failure
    (status(429), "http_429", 4),
    (sleep(2.0), "timeout", 2),                        # a timeout is retried once: a reply too long would only
    (NOT_JSON, "not_json", 4),                         # time out again (a slow local teacher, issue 19)
    (drip(0.05), "timeout", 2),                        # every byte in time, the whole body too late
    (drip(1.0), "timeout", 2),                         # stalls mid-body
    (EMPTY_CHOICES, "no_choices", 4),
    (status(400, text="score 429"), "http_400", 1),    # not retryable; the body is never parsed as a reply
    (reply("Both answers are fine."), "no_score", ASKS),  # complete replies are re-asked --reask times
    (reply("Assistant 1: 9\nAssistant 2:", finish_reason="length"), "length", ASKS),
    (REFUSAL, "refusal", ASKS),
    (reply("<think>Assistant 1: 9\nAssistant 2: 1"), "empty_reply", ASKS),
])
def test_persistent_faults_become_recorded_failures(tmp_path, fault, reason, requests):
    with FaultServer(fault=lambda body, n: fault) as server:
        summary, train, annotated, failures = run_rows(server, [PAIR], tmp_path)
    assert train == [] and annotated == []
    assert len(server.bodies) == requests  # bounded, and the row stops at its first failed stage
    (f,) = failures
    assert (f["id"], f["stage"], f["reason"], f["dropped"], f["attempts"]) == ("r1", "annotate", reason, False, requests)
    assert summary["stages"]["annotate"]["failures"] == {reason: 1}
    if not reason.startswith(("http", "timeout", "not_json", "no_choices")):  # complete replies: re-asked
        # every unusable reply is recorded, and each re-ask was a different request
        assert [r["reason"] for r in f["replies"]] == [reason] * ASKS
        assert len({cache_key(b) for b in server.bodies}) == ASKS
        assert summary["stages"]["annotate"]["reasks"] == ASKS - 1


def test_json_mode_probe_and_fallback(tmp_path):
    with FaultServer(json_mode=True) as server:
        summary, train, _, _ = run_rows(server, [PAIR], tmp_path / "a", json_mode="auto")
    assert summary["json_mode"] is True and len(train) == 1
    assert server.bodies[1]["response_format"] == {"type": "json_object"}
    with FaultServer(json_mode=False) as server:  # answers 500 to response_format, like llama.cpp's json_schema
        summary, train, _, _ = run_rows(server, [PAIR], tmp_path / "b", json_mode="auto")
        assert summary["json_mode"] is False and len(train) == 1 and len(server.bodies) == 6
        run_rows(server, [PAIR], tmp_path / "b", json_mode="auto")  # the verdict is remembered in the cache
        assert len(server.bodies) == 6


def test_server_differences_in_the_request_body(tmp_path):
    with FaultServer() as server:
        run_rows(server, [PAIR], tmp_path, disable_thinking=True, max_tokens_param="max_completion_tokens")
    for body in server.bodies:
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert "max_completion_tokens" in body and "max_tokens" not in body


def test_the_teacher_key_goes_to_candidate_urls_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("RMD_TEST_KEY", "sk-teacher")
    monkeypatch.setenv("RMD_CANDIDATE_KEY", "sk-candidate")
    sent = []
    orig = teacher.Client.post

    def spy(self, body, **kw):
        sent.append((self.url, self.api_key))
        return orig(self, body, **kw)
    monkeypatch.setattr(teacher.Client, "post", spy)
    bare = [{"id": "bare", "prompt": "tell me"}]
    with FaultServer() as server, FaultServer() as other:
        mine, theirs = teacher.chat_url(server.url), teacher.chat_url(other.url)
        for name, overrides, keys in [
                ("default", {"candidate_urls": other.url}, {mine: {"sk-teacher"}, theirs: {""}}),  # theirs: sk-teacher
                ("explicit", {"candidate_urls": other.url, "candidate_api_key_env": "RMD_CANDIDATE_KEY"},
                 {mine: {"sk-teacher"}, theirs: {"sk-candidate"}}),
                ("the teacher's url", {"candidate_urls": server.url}, {mine: {"sk-teacher"}})]:
            sent.clear()
            run_rows(server, bare, tmp_path / name, api_key_env="RMD_TEST_KEY", candidate_models="cand-a,cand-b",
                     **overrides)
            by_url = {}
            for url, key in sent:
                by_url.setdefault(url, set()).add(key)
            assert by_url == keys, name


def test_api_key_is_sent_but_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("RMD_TEST_KEY", "sk-secret-123")
    seen = []
    with FaultServer() as server:
        server.fault = lambda body, n: None
        orig = teacher.Client.post

        def spy(self, body, **kw):
            seen.append(self.api_key)
            return orig(self, body, **kw)
        monkeypatch.setattr(teacher.Client, "post", spy)
        run_rows(server, [PAIR], tmp_path, api_key_env="RMD_TEST_KEY")
    assert set(seen) == {"sk-secret-123"}
    for name in os.listdir(tmp_path / "out"):
        assert "sk-secret-123" not in (tmp_path / "out" / name).read_text()


def test_cache_rerun_sends_nothing_and_tolerates_a_torn_line(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    with FaultServer() as server:
        _, train1, _, _ = run_rows(server, rows, tmp_path)
        sent = len(server.bodies)
        cache = tmp_path / "out" / "cache.jsonl"
        with open(cache, "a") as f:
            f.write('{"key": "torn-by-a-ki')
        summary, train2, _, _ = run_rows(server, rows, tmp_path)
        assert len(server.bodies) == sent and train1 == train2
        assert summary["stages"]["annotate"]["cache_hits"] == 8 and cache.read_text().endswith("\n")


def test_in_flight_counts_requests_on_the_wire_not_rows_waiting(tmp_path):
    """Issue 19: the progress line's "in flight" said 4 with --workers=2 (it counted keys being fetched: rows
    waiting for a slot too). With one slot and three askers, one request is on the wire."""
    import threading
    from asker import Asker
    release, arrived = threading.Event(), threading.Event()

    def hold(body, n):
        arrived.set()
        release.wait(30)
    with FaultServer(fault=hold) as server:
        asker = Asker(distill.DistillConfig(out=str(tmp_path), teacher_url=server.url, teacher_model="t", workers=1),
                      ("generate",))
        body = lambda i: {"model": "t", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8}  # noqa
        threads = [threading.Thread(target=asker.request, args=("generate", asker.teacher, body(i))) for i in range(3)]
        for thread in threads:
            thread.start()
        arrived.wait(30)
        while len(asker.cache.inflight) < 3:  # all three are asking (two of them wait for the one slot)
            time.sleep(0.01)
        assert asker.in_flight() == 1 and server.active == 1
        release.set()
        for thread in threads:
            thread.join()
    assert asker.in_flight() == 0 and asker.stats["generate"]["sent"] == 3
    assert asker.stats["generate"]["request_s"] > 0  # summed seconds on the wire (their size is not asserted)
    asker.cache.close()


def test_the_cache_keeps_each_replys_row_stage_and_order_and_old_caches_still_replay(tmp_path):
    """Issue 19: a user can audit what the teacher said to which question; cache lines written before (key,
    stage, attempts, reply only) are still read."""
    with FaultServer(fault=_first_restyle_unmarked()) as server:
        run_rows(server, [PAIR], tmp_path, restyle=True)
        n = len(server.bodies)
        cache = tmp_path / "out" / "cache.jsonl"
        entries = [json.loads(line) for line in cache.read_text().splitlines()]
        audit = sorted((e["stage"], e.get("row"), e.get("order"), e.get("reask", 0)) for e in entries if "reply" in e)
        assert audit == [("annotate", "r1", "a_first", 0), ("annotate", "r1", "b_first", 0),
                         ("generate", "r1", None, 0), ("refine", "r1", None, 0),
                         ("restyle", "r1", "chosen", 0), ("restyle", "r1", "chosen", 1),
                         ("restyle", "r1", "rejected", 0), ("restyle_check", "r1", "chosen", 0),
                         ("restyle_check", "r1", "rejected", 0), ("score", "r1", None, 0)]
        assert all(e["seconds"] >= 0 for e in entries if "reply" in e)
        old = [{k: e[k] for k in ("key", "stage", "attempts", "reply", "supported") if k in e} for e in entries
               if "key" in e]  # as an rmd before issue 19 wrote them (and before the header line)
        cache.write_text("".join(json.dumps(e) + "\n" for e in old))
        summary, train, _, _ = run_rows(server, [PAIR], tmp_path, restyle=True)
        assert len(server.bodies) == n and sum(st["cache_hits"] for st in summary["stages"].values()) == 10


def _first_restyle_unmarked():
    seen = []

    def fault(body, n):
        if protocol.STAGE_HEADERS["restyle"] in body["messages"][0]["content"] and not seen:
            seen.append(n)
            return reply("no marker here")
    return fault
