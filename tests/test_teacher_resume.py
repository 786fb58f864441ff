"""Kill-and-resume: `python rmd.py distill` is SIGKILLed mid-run (twice) and run again with the same command.
No request whose reply reached the cache is sent again, and the output equals an uninterrupted run's."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from asker import cache_key
from protocol import tagged
from tools.fault_server import FaultServer, reply
def no_number_for_some_rows(body, n):
    """A deterministic content fault, so failures.jsonl is part of the comparison too."""
    text = body["messages"][0]["content"]
    if text.startswith("[rmd:annotate]") and tagged(text, "question")[0].endswith("7"):
        return reply("I would rather not say.")


def cache_keys(path):
    keys = []
    with open(path) as f:
        for line in f:
            try:
                keys.append(json.loads(line)["key"])
            except (ValueError, KeyError):  # torn last line, the header line
                pass
    return keys


@pytest.mark.slow
def test_kill_and_resume_sends_nothing_twice_and_gives_identical_output(tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
            for i in range(40)]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FaultServer(latency=0.03, fault=no_number_for_some_rows) as server:
        def command(out):
            return [sys.executable, os.path.join(ROOT, "rmd.py"), "distill", "--data", str(data), "--out", str(out),
                    "--teacher-url", server.url, "--teacher-model", "teacher", "--workers", "4",
                    "--json-mode", "off", "--backoff-base", "0.01", "--progress", "false"]

        out = tmp_path / "resumed"
        cache = out / "cache.jsonl"
        cached_at_kill, n_at_kill = set(), 0
        for kill_at in (60, 130, None):  # cache lines when the process is killed; None: let it finish
            log = open(tmp_path / f"log{kill_at}.txt", "w")
            proc = subprocess.Popen(command(out), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 60
            while kill_at and time.time() < deadline and proc.poll() is None and \
                    (not cache.exists() or len(cache.read_bytes().splitlines()) < kill_at):
                time.sleep(0.005)
            if kill_at:
                proc.kill()  # SIGKILL: no cleanup, maybe a torn last line
            proc.wait()
            log.close()
            assert proc.returncode == (-9 if kill_at else 0), (tmp_path / f"log{kill_at}.txt").read_text()
            sent = [cache_key(b) for b in server.bodies[n_at_kill:]]
            assert not set(sent) & cached_at_kill, "a request already in the cache was sent again"
            assert len(sent) == len(set(sent))
            cached_at_kill, n_at_kill = set(cache_keys(cache)), len(server.bodies)
        keys_all = [cache_key(b) for b in server.bodies]
        repeated = len(keys_all) - len(set(keys_all))
        # only requests sent but not yet in the cache at a kill may repeat: at most one per row thread (2 x workers)
        assert repeated <= 2 * 8
        print(f"{len(keys_all)} requests over 3 runs, {repeated} repeated (in flight at a kill)")

        n_before = len(server.bodies)
        subprocess.run(command(tmp_path / "straight"), check=True, capture_output=True)
        assert len(server.bodies) - n_before == len(set(keys_all))  # a clean run sends each request once

    for name in ("train.jsonl", "annotated.jsonl", "failures.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    train = (out / "train.jsonl").read_text().splitlines()
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    refined = [r for r in train if json.loads(r)["provenance"]["source"] == "refined"]
    assert len(refined) == 36 and [f["reason"] for f in failures] == ["no_score"] * 4
