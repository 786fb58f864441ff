"""Shared test set-up: the repository root and tests/ on sys.path (so tests import rmd's modules, demo/ and tools/,
and each other's helpers), and the builders more than one test file uses (`from conftest import tiny_model, ...`):
row files, a tiny random reward model, an in-memory ChatML tokenizer, a small training config and its run, a
recorder of fsyncs and renames, an in-process `rmd.py` run that must end in one error line, and a distill run of a
few rows against a fault_server.py teacher (run_rows, with FAST settings, a clean PAIR, ASKS requests per re-asked
reply)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import distill  # noqa: E402  (after the path: the repository's own module)


def write_jsonl(path, rows):
    """Rows (dicts, or raw strings written as they are) -> a JSONL file; returns its path as a string."""
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def easy_rows(n, seed=0):
    """A preference any student learns in a few steps: a complete sentence beats a terse fragment."""
    import random
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.randint(0, 999)
        rows.append({"prompt": f"Say something about {a}.", "chosen": f"{a} is a fine number, thanks.",
                     "rejected": f"{a}??", "chosen_score": 8, "rejected_score": rng.choice([2, 3, 4]),
                     "teacher_response": f"The number {a} is fine."})
    return rows


def tiny_model(seed=0, head="mlp", max_len=256, likelihood=False):
    """The built-in tiny student with random weights (tiny-scratch) and a value head, in train mode; with likelihood,
    as with_likelihood makes it."""
    import torch
    from demo import tiny_lm
    from model import RewardModel
    torch.manual_seed(seed)
    lm, tok = tiny_lm.load_tiny("tiny-scratch", 0, max_len)
    return with_likelihood(RewardModel(lm, tok, head=head, dropout=0.0, max_len=max_len)) if likelihood else \
        RewardModel(lm, tok, head=head, dropout=0.0, max_len=max_len)


def with_likelihood(model):
    """`model` with the likelihood term at a weight of 0.3 (not its initial 0, so that it shows in the rewards) and
    a trained LM that differs from its frozen reference, as after training."""
    import torch
    from model import RewardModel
    out = RewardModel(model.lm, model.tokenizer, model.head_kind, model.dropout, model.max_len, likelihood=True)
    out.value_head.load_state_dict(model.value_head.state_dict())
    with torch.no_grad():
        out.likelihood_weight.fill_(0.3)
        for p in out.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return out


def chatml_tokenizer(pad="<|endoftext|>", words="the question? good bad answer x y"):
    """A small byte-level BPE tokenizer with a ChatML chat template (as SmolLM2's), built in memory; pad="<|im_end|>"
    makes its pad token its eos, as SmolLM2's is."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([f"Question {i}: {words}" for i in range(50)], vocab_size=300,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token=pad)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def train_cfg(tmp_path, data, **kw):
    """A few-second training run of the tiny random student."""
    import train
    base = dict(data=data, out=str(tmp_path / "out"), model="tiny-scratch", max_len=128, batch_size=8, lr=1e-3,
                min_steps=0, warmup=0.1, log_interval=1, seed=3)
    base.update(kw)
    return train.TrainConfig(**base)


def train_tiny(cfg, **kw):
    """train.train with the demo's students ('tiny', 'tiny-scratch') loadable by name, as `rmd.py train` loads them."""
    import train
    from demo import tiny_lm
    return train.train(cfg, backbone=tiny_lm.load_tiny, **kw)


def log_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["step"], r["pair_loss"], r["lm_loss"]) for r in map(json.loads, f)]


def record_fsyncs(monkeypatch):
    """os.fsync and os.replace record what they touch, in order: ("fsync", path) and ("replace", src, dst)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def synced_around(events, src, dst):
    """(paths fsynced before the rename src -> dst, paths fsynced after it)."""
    swap = events.index(("replace", str(src), str(dst)))
    return ({e[1] for e in events[:swap] if e[0] == "fsync"}, {e[1] for e in events[swap:] if e[0] == "fsync"})


def one_line_error(argv):
    """Run rmd.main in-process; the message of the SystemExit it must raise (an 'error: ...' line)."""
    import rmd
    with pytest.raises(SystemExit) as e:
        rmd.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


# restyle off: these tests count the requests of the paper's five stages; test_restyle_* turn it on
FAST = dict(backoff_base=0.01, backoff_max=0.05, timeout=0.5, max_retries=3, json_mode="off", progress=False,
            restyle=False, original_pairs=False)


ASKS = 1 + distill.DistillConfig().reask  # a complete reply that is no answer: the first ask and its re-asks


def run_rows(server, rows, tmp_path, **overrides):
    """distill.distill over `rows` against `server` (FAST, 4 workers) -> (summary, train, annotated, failures)."""
    data = tmp_path / "in.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = distill.DistillConfig(data=str(data), out=str(tmp_path / "out"), teacher_url=server.url,
                                teacher_model="teacher", **{"workers": 4, **FAST, **overrides})
    summary = distill.distill(cfg)
    read = lambda name: [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]  # noqa: E731
    return summary, read("train.jsonl"), read("annotated.jsonl"), read("failures.jsonl")


PAIR = {"id": "r1", "prompt": "What is 2+2?", "chosen": "good: 4", "rejected": "bad: 5"}
