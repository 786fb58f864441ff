"""demo/tiny_lm.py: the demo's tiny student, its pretraining cache key (what determines the weights, not version
strings), the shipped copy, and one builder when several processes want the same model."""
import json
import os
import threading

import pytest

from demo import tiny_lm
from model import ByteTokenizer, load_backbone


def tiny_world():
    tok = ByteTokenizer()
    sequences = tiny_lm.world_sequences(tok, [("What is 1 + 1?", "2"), ("What is 2 + 2?", "2 + 2 = 4.")])
    return tok, sequences, tiny_lm.tiny_config(tok, 1024), dict(tiny_lm.SETTINGS, steps=2, batch_size=2, warmup=1)


def test_shipped_tiny_student_is_the_one_the_code_would_build():
    """data/tiny-world-lm is used only if its key matches: a change to the world's text, the rendering or the
    pretraining settings must come with `python -m demo.tiny_lm` (or every first run pretrains for minutes)."""
    from demo import sim
    tok = ByteTokenizer()
    sequences = tiny_lm.world_sequences(tok, sim.world_corpus(sim.WorldConfig()))
    assert tiny_lm.weights_key(sequences, tiny_lm.tiny_config(tok, 1024), tiny_lm.SETTINGS) == tiny_lm.shipped_key()
    info = json.load(open(os.path.join(tiny_lm.SHIPPED, "pretrain.json")))
    assert info["knowledge"]["correct_beats_wrong_same_style"]["all"] >= 0.9
    lm, tokenizer = tiny_lm.load_tiny("tiny", 0, 256)
    assert isinstance(tokenizer, ByteTokenizer) and lm.config.num_hidden_layers == 4


def test_the_key_covers_what_determines_the_weights_and_no_version_string():
    """A new transformers release adds or renames config fields and stamps its version: the key must not move (the
    shipped student stays valid); a change of shape, numerics or settings must move it."""
    _, sequences, config, settings = tiny_world()
    key = tiny_lm.weights_key(sequences, config, settings)
    relabelled = tiny_lm.tiny_config(ByteTokenizer(), 1024)
    relabelled.transformers_version = "99.0.0"
    relabelled.use_cache = not relabelled.use_cache
    relabelled.architectures = ["SomethingElse"]
    relabelled.some_new_field_of_a_later_release = 1
    assert tiny_lm.weights_key(sequences, relabelled, settings) == key
    wider = tiny_lm.tiny_config(ByteTokenizer(), 1024)
    wider.hidden_size = 256
    assert tiny_lm.weights_key(sequences, wider, settings) != key
    assert tiny_lm.weights_key(sequences, config, dict(settings, lr=1e-4)) != key
    assert tiny_lm.weights_key(sequences[:1], config, settings) != key


def test_tiny_pretraining_is_cached_by_what_determines_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_lm, "CACHE", str(tmp_path))
    tok, sequences, config, settings = tiny_world()
    path = tiny_lm.pretrained(sequences, config, tok.pad_token_id, settings, log=lambda *a: None,
                              probe=lambda lm: {"probed": True})
    info = json.load(open(os.path.join(path, "pretrain.json")))
    assert info["knowledge"] == {"probed": True} and info["key"] == os.path.basename(path)
    lm, tokenizer = load_backbone(path, 0, 2048)  # a byte-tokenizer folder; positions grow to max_len
    assert isinstance(tokenizer, ByteTokenizer) and lm.config.max_position_embeddings == 2048
    monkeypatch.setattr(tiny_lm, "pretrain", lambda *a, **k: pytest.fail("pretrained twice"))
    assert tiny_lm.pretrained(sequences, config, tok.pad_token_id, settings, log=lambda *a: None) == path


def test_two_runs_that_need_the_same_student_pretrain_it_once(tmp_path, monkeypatch):
    """The demo and its baseline start together: one builds (holding <key>.lock), the other says whose build it
    waits for, waits, and reuses the result. The builder is held inside pretrain until the waiter has said so."""
    monkeypatch.setattr(tiny_lm, "CACHE", str(tmp_path))
    tok, sequences, config, settings = tiny_world()
    real_pretrain, builds, waiting = tiny_lm.pretrain, [], threading.Event()

    def slow_pretrain(*a, **k):
        builds.append(threading.current_thread().name)
        assert waiting.wait(60), "the second run never waited for the first"
        return real_pretrain(*a, **k)
    monkeypatch.setattr(tiny_lm, "pretrain", slow_pretrain)
    paths, logs = {}, {"first": [], "second": []}

    def run(name):
        def log(line):
            logs[name].append(line)
            if "waiting for it" in line:
                waiting.set()
        paths[name] = tiny_lm.pretrained(sequences, config, tok.pad_token_id, settings, log=log)
    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    while not builds and first.is_alive():  # the first holds the lock and is pretraining
        first.join(0.01)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    first.join(120)
    second.join(120)
    assert builds == ["first"] and paths["first"] == paths["second"]
    assert any(f"pid {os.getpid()}" in line for line in logs["second"])
    assert os.path.exists(os.path.join(paths["first"], "pretrain.json"))
