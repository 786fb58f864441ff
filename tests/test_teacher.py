"""teacher.py: the HTTP client under injected faults (retries, Retry-After, fatal errors, hostile bodies, content
parts), the request cache (its header, a torn line or write, a file it did not write, replies kept on disk, exactly
once across threads, group commit), the rate limiter, and the import rules (the teacher side imports no torch;
teacher.py stands alone)."""
import json
import os
import sys
import time

import pytest

import teacher
from conftest import ASKS, PAIR, run_rows
from protocol import tagged
from tools.fault_server import EMPTY_CHOICES, NOT_JSON, FaultServer, raw, sleep, status


@pytest.mark.slow
def test_the_teacher_side_imports_no_torch_and_the_client_stands_alone():
    """distill.py, asker.py, protocol.py and teacher.py run without torch; teacher.py needs only the standard library,
    requests and (optionally) tiktoken, so it can be copied alone."""
    import ast
    import subprocess
    code = "import sys, distill, asker, protocol, teacher; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "teacher.py"), encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - sys.stdlib_module_names <= {"requests", "tiktoken"}, imported - sys.stdlib_module_names


@pytest.mark.slow
def test_teacher_py_copied_alone_posts_and_caches(tmp_path):
    """teacher.py in a folder of its own (no other rmd module importable) runs its docstring's example."""
    import shutil
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(root, "teacher.py"), alone / "teacher.py")
    code = f"""
import dataclasses, sys
sys.path.insert(0, {str(alone)!r})
from teacher import Cache, Client, RateLimiter, reply_problem, request_key
body = {{"model": "m", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 64}}
client = Client(sys.argv[1], workers=2, limiter=RateLimiter(rpm=500))
reply, attempts = client.post(body)
assert reply_problem(reply) is None and attempts == 1, reply
cache = Cache({str(alone / "cache.jsonl")!r})
for expect_cached in (False, True):
    entry, cached = cache.fetch(request_key(body, "v1"), lambda: {{"reply": dataclasses.asdict(client.post(body)[0])}})
    assert cached == expect_cached and entry["reply"]["content"] == reply.content
for name in ("protocol", "distill", "formats", "cli"):
    assert name not in sys.modules, name
"""
    with FaultServer() as server:
        subprocess.run([sys.executable, "-I", "-c", code, server.url], check=True, cwd=alone)
        assert len(server.bodies) == 2  # the cached fetch sent nothing


def test_transient_faults_are_retried_and_retry_after_is_honoured(tmp_path, monkeypatch):
    waits, back_off = [], teacher.Client._back_off
    monkeypatch.setattr(teacher.Client, "_back_off", lambda self, attempt, wait: (waits.append(wait),
                                                                                   back_off(self, attempt, wait)))
    with FaultServer() as server:
        server.script(status(429, retry_after="1"), status(503), NOT_JSON, EMPTY_CHOICES, sleep(2.0))
        summary, train, _, failures = run_rows(server, [PAIR], tmp_path, max_retries=5)
    assert failures == [] and len(train) == 1
    assert waits[0] == 1.0 and waits[1:] == [None] * 4  # the 429's Retry-After, then backoff of its own
    assert len(server.bodies) == 5 + 5
    assert summary["stages"]["annotate"]["sent"] == 2 + 5


def test_fatal_http_errors_stop_the_run(tmp_path):
    with FaultServer(fault=lambda body, n: status(401, text='{"error": "bad key"}')) as server:
        with pytest.raises(teacher.FatalError, match="401"):
            run_rows(server, [PAIR] * 1, tmp_path)


@pytest.mark.parametrize("foreign", [b"my notes\nthe last line has no newline", b'{"a": 1}\n{"b": 2}\n{"c": 3',
                                     b"\x00\x01binary", b'{"key": "k", "reply": {}}\nnot an entry\n',
                                     b"single line, no newline", b'{"key": "row-1", "text": "a dataset"}\n{"key": "ro'])
def test_a_file_the_cache_did_not_write_is_refused_and_left_untouched(tmp_path, foreign):
    path = tmp_path / "notes.txt"
    path.write_bytes(foreign)
    with pytest.raises(ValueError, match=r"notes.txt is not a request cache .* left untouched"):
        teacher.Cache(str(path))
    assert path.read_bytes() == foreign  # used to be cut at its last newline and appended to
    with FaultServer() as server, pytest.raises(ValueError, match="not a request cache"):
        run_rows(server, [PAIR], tmp_path, cache=str(path))
    assert path.read_bytes() == foreign and not server.bodies  # refused before any request


def test_a_cache_starts_with_its_header_and_only_then_is_its_torn_line_cut(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = teacher.Cache(str(path))
    cache.fetch("k1", lambda: {"reply": "one"})
    cache.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == teacher.CACHE_HEADER and json.loads(lines[1])["key"] == "k1"
    with open(path, "a") as f:
        f.write('{"key": "k2", "re')  # killed mid-write
    cache = teacher.Cache(str(path))
    assert cache.fetch("k1", lambda: pytest.fail("sent again")) == ({"key": "k1", "reply": "one"}, True)
    cache.close()
    assert path.read_text().splitlines() == lines


def test_a_cache_written_before_the_header_is_still_used(tmp_path, capsys):
    path = tmp_path / "cache.jsonl"
    k1, k2, k3 = (teacher.request_key({"n": n}) for n in (1, 2, 3))
    old = f'{{"key":"{k1}","reply":"one"}}\n{{"key":"{k2}","reply":"two"}}\n{{"key":"{k3}","re'  # killed mid-write
    path.write_text(old)
    cache = teacher.Cache(str(path))
    assert "without a header line" in capsys.readouterr().err
    assert cache.fetch(k2, lambda: pytest.fail("sent again"))[1] is True
    cache.fetch(k3, lambda: {"reply": "three"})
    cache.close()
    assert path.read_text() == old[:old.rindex("\n") + 1] + f'{{"key":"{k3}","reply":"three"}}\n'


def test_an_empty_file_becomes_a_cache(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text("")
    teacher.Cache(str(path)).close()
    assert json.loads(path.read_text()) == teacher.CACHE_HEADER


class FakeClock:
    """A clock that moves only when the code under test sleeps: waits are counted exactly, not timed."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_rate_limit_is_respected():
    clock = FakeClock()
    limiter = teacher.RateLimiter(rpm=600, clock=clock, sleep=clock.sleep)  # 10/s, 10 s burst: 100 at once
    for _ in range(100):
        limiter.acquire(1)
    assert clock.now == 0.0
    for _ in range(5):  # then one per 0.1 s
        limiter.acquire(1)
    assert clock.now == pytest.approx(0.5)
    clock = FakeClock()
    limiter = teacher.RateLimiter(tpm=60000, clock=clock, sleep=clock.sleep)  # 1000 tokens/s, 10000 burst
    for tokens in (10000, 500, 500):
        limiter.acquire(tokens)
    assert clock.now == pytest.approx(1.0)
    limiter.acquire(20000)  # more than the burst: waits for a full bucket, then borrows ahead
    assert clock.now == pytest.approx(11.0)


def completion(message, finish_reason="stop"):
    return raw(json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}))


@pytest.mark.parametrize("body,reason,requests", [
    (raw('{"choices": [{"message": "hi"}]}'), "no_choices", 4),
    (raw('{"error": {"message": "overloaded"}}'), "error_body", 4),
    (raw("[" * 100000), "not_json", 4),
    (raw('"just a string"'), "bad_body", 4),
    (completion({"role": "assistant", "content": 5}), "empty_reply", ASKS),  # complete replies: re-asked
    (completion({"role": "assistant", "content": None, "reasoning_content": "Assistant 1: 9\nAssistant 2: 1"}),
     "empty_reply", ASKS),  # reasoning fields are never read
    (completion({"role": "assistant", "content": "Assistant 1: 9\nAssistant 2: 1"}, "content_filter"), "refusal", ASKS),
])
def test_hostile_bodies_are_failures_not_crashes(tmp_path, body, reason, requests):
    with FaultServer(fault=lambda b, n: body) as server:
        summary, train, _, failures = run_rows(server, [PAIR], tmp_path)
    assert train == [] and len(server.bodies) == requests
    assert (failures[0]["stage"], failures[0]["reason"]) == ("annotate", reason)


def test_content_parts_and_reasoning_fields(tmp_path):
    def fault(body, n):
        if body["messages"][0]["content"].startswith("[rmd:annotate]"):
            first_good = "good" in tagged(body["messages"][0]["content"], "assistant-1")[0]
            text = f"Assistant 1: {8 if first_good else 2}\nAssistant 2: {2 if first_good else 8}"
            return completion({"role": "assistant", "content": [{"type": "text", "text": text}],
                               "reasoning_content": "Assistant 1: 1\nAssistant 2: 10"})
    with FaultServer(fault=fault) as server:
        _, train, annotated, failures = run_rows(server, [PAIR], tmp_path)
    assert failures == [] and (annotated[0]["chosen_score"], annotated[0]["rejected_score"]) == (8.0, 2.0)


def test_a_torn_last_entry_is_cut_and_only_it_is_sent_again(tmp_path):
    """kill -9 in the middle of a line (here: the file cut inside its last entry): the reopened cache cuts the torn
    line, serves every complete entry from its place in the file (non-ASCII replies: offsets are bytes), and sends
    the torn one again, once."""
    path = tmp_path / "cache.jsonl"
    cache = teacher.Cache(str(path))
    for n in range(5):
        cache.fetch(f"k{n}", lambda n=n: {"reply": f"réponse {n} ✓ " + "日本" * n})
    cache.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # killed while writing k4's line
    cache, sent = teacher.Cache(str(path)), []
    assert len(cache) == 4
    for n in range(5):
        answer = {"reply": f"réponse {n} ✓ " + "日本" * n}
        entry, cached = cache.fetch(f"k{n}", lambda n=n, answer=answer: sent.append(n) or answer)
        assert entry == {"key": f"k{n}", **answer} and cached == (n != 4)
    cache.close()
    assert sent == [4] and path.read_bytes() == whole


def test_a_write_that_fails_midway_leaves_no_half_line(tmp_path):
    """A disk that fills up in the middle of a line: put() raises (the request is not stored, the next run sends
    it), the half line is cut at once, and the lines written after it, and before, are whole and served."""
    path = tmp_path / "cache.jsonl"
    cache = teacher.Cache(str(path))
    cache.fetch("k1", lambda: {"reply": "one"})
    file = cache.file

    class DiskFull:
        def __getattr__(self, name):
            return getattr(file, name)

        def write(self, data):
            file.write(data[:7])
            raise OSError(28, "No space left on device")
    cache.file = DiskFull()
    with pytest.raises(OSError, match="No space"):
        cache.fetch("k2", lambda: {"reply": "two"})
    cache.file = file
    assert cache.fetch("k3", lambda: {"reply": "three"}) == ({"key": "k3", "reply": "three"}, False)
    assert cache.fetch("k2", lambda: {"reply": "two, sent again"})[0]["reply"] == "two, sent again"
    cache.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines[1:]] == ["k1", "k3", "k2"]
    cache = teacher.Cache(str(path))
    assert [cache.get(k)["reply"] for k in ("k1", "k2", "k3")] == ["one", "two, sent again", "three"]
    cache.close()


def test_replies_stay_on_disk_and_the_index_is_small(tmp_path):
    """The cache keeps no reply in memory: an entry is read back from the file when asked for (changed on disk, it
    comes back changed), opening a 16 MB cache streams it (its peak memory is not the file's size), and the index
    costs a few dozen bytes per entry, not the entry's 4 kB."""
    import tracemalloc
    path = tmp_path / "cache.jsonl"
    cache = teacher.Cache(str(path))
    cache.fetch("big", lambda: {"reply": "x" * 1_000_000})
    assert cache.get("big")["reply"] == "x" * 1_000_000
    path.write_bytes(path.read_bytes().replace(b"xxxxx\"", b"yyyyy\""))  # same length, another reply
    assert cache.get("big")["reply"] == "x" * 999_995 + "yyyyy"
    cache.close()
    n = 4000
    with open(path, "w") as f:
        f.write(teacher.canonical(teacher.CACHE_HEADER) + "\n")
        for i in range(n):
            f.write(teacher.canonical({"key": teacher.request_key({"n": i}), "reply": {"content": f"{i} " * 1000}})
                    + "\n")
    tracemalloc.start()
    cache = teacher.Cache(str(path))
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(cache) == n and cache.get(teacher.request_key({"n": 17}))["reply"]["content"] == "17 " * 1000
    cache.close()
    assert held / n < 300 and peak < path.stat().st_size / 8, (held / n, peak)


def test_two_keys_with_one_digest_never_get_each_others_reply(tmp_path, monkeypatch):
    """The index names keys by a 64-bit digest; were two keys to share one, the second is sent (its own reply),
    never answered with the first's."""
    monkeypatch.setattr(teacher, "_digest", lambda key: 42)
    cache = teacher.Cache(str(tmp_path / "cache.jsonl"))
    cache.fetch("k1", lambda: {"reply": "one"})
    assert cache.fetch("k2", lambda: {"reply": "two"}) == ({"key": "k2", "reply": "two"}, False)
    assert cache.get("k1") is None and cache.get("k2")["reply"] == "two"  # k1 is sent again if asked for
    cache.close()


def test_writers_share_fsyncs_and_none_returns_before_its_line_is_synced(tmp_path, monkeypatch):
    """Group commit: eight threads store a reply while the first fsync runs; the fsync after it covers all seven
    (two fsyncs, not eight, so an fsync per request does not cap the request rate), and no fetch returns before an
    fsync that started after its line was written."""
    import threading
    path, n = tmp_path / "cache.jsonl", 8
    cache = teacher.Cache(str(path))
    synced, fsync = [], os.fsync

    def slow_fsync(fd):
        while not synced and os.fstat(fd).st_size < cache_size(n) and time.monotonic() < give_up:
            time.sleep(0.001)  # the first fsync lasts until every thread has written its line
        size = os.fstat(fd).st_size
        fsync(fd)
        synced.append(size)

    def cache_size(lines):
        return len(teacher.canonical(teacher.CACHE_HEADER)) + 1 + lines * len('{"key":"k0","reply":"r"}\n')
    returned = {}

    def store(i):
        cache.fetch(f"k{i}", lambda: {"reply": "r"})
        returned[i] = max(synced)
    give_up = time.monotonic() + 30  # a bound on the wait (for a cache that syncs under its lock), not a timing
    monkeypatch.setattr(teacher.os, "fsync", slow_fsync)
    threads = [threading.Thread(target=store, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    lines = path.read_bytes().splitlines(keepends=True)
    ends = {json.loads(line)["key"]: sum(map(len, lines[:k + 1])) for k, line in enumerate(lines) if k}
    assert len(synced) <= 2 + 1  # at most two for the eight lines (one if all wrote before the first), one at close
    assert all(returned[i] >= ends[f"k{i}"] for i in range(n))


def test_threads_asking_for_one_key_send_it_once(tmp_path):
    """Exactly once within a process: threads asking for a key that is in flight wait for its entry (read back
    from the file) instead of sending it again."""
    import threading
    cache, sent, results, start = teacher.Cache(str(tmp_path / "cache.jsonl")), [], [], threading.Barrier(8)

    def send():
        sent.append(1)
        time.sleep(0.05)  # (not a bound on anything: it lets the other threads find the key in flight)
        return {"reply": "once"}

    def ask():
        start.wait()
        results.append(cache.fetch("k", send))
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    assert sent == [1] and sorted(cached for _, cached in results) == [False] + [True] * 7
    assert all(entry == {"key": "k", "reply": "once"} for entry, _ in results)
