"""tiny_lm.py -- the demo's tiny student (rmd.py train --model=tiny, tiny-scratch) and its pretraining, cached on disk.

A reward model is a pretrained LM that learns preferences; it can only reward a correct answer it can recognise. The
built-in tiny student (rmd.py train --model=tiny) therefore first learns the simulated world's text (sim.world_corpus:
every task with its correct answer, in every style) by plain next-token prediction. That run is deterministic given
its inputs, so it is done once and kept under out/tiny_lm/<key>/ as an ordinary HF causal-LM folder with a
ByteTokenizer marker (model.load_backbone reads it), where <key> is a hash of the token sequences, the model config
and the settings below. Needs torch and transformers.

    path = tiny_lm.pretrained(sequences, config, log=print)     # build (minutes on a CPU) or reuse
    lm = LlamaForCausalLM.from_pretrained(path)
    lm, tokenizer = tiny_lm.load_tiny("tiny")                    # rmd.py: train(cfg, backbone=load_tiny)
"""

if not __package__:  # run as a file: the repository's modules are importable only from its root
    raise SystemExit("error: run it from the repository root as a module: python -m demo.tiny_lm")

import copy
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import files
from cli import Progress, one_line_errors, parse_overrides
from formats import as_messages
from model import BYTE_TOKENIZER, ByteTokenizer, cut_layers, encode, load_backbone, render_answer, render_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
CACHE = os.path.join(ROOT, "out", "tiny_lm")
# Enough passes for the 4-layer student to know the world's answers (measured: RESULTS.md's ablation).
SETTINGS = {"steps": 1200, "batch_size": 32, "lr": 3e-3, "warmup": 100, "weight_decay": 0.01, "seed": 0,
            "version": 1}
# The default world's pretrained student ships with rmd (data/tiny-world-lm, 3.5 MB of fp32 safetensors): building it
# costs ~10 CPU-minutes (13 min on the loaded 2-core development machine), longer than the whole demo. `python
# -m demo.tiny_lm` rebuilds it. It is used only when its key matches what the code would build now, so a changed world,
# rendering or setting never loads a stale model: it is then built once under out/tiny_lm/<key>/.
SHIPPED = os.path.join(ROOT, "data", "tiny-world-lm")


# What of a model config determines the pretrained weights: the architecture's shape, its numerics and the
# initialisation. Not version strings, dtype labels or generation defaults (transformers adds and renames such fields
# between releases; a key over them would make every new release pretrain again).
WEIGHT_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                 "tie_word_embeddings", "attention_bias", "mlp_bias", "initializer_range", "pad_token_id",
                 "max_position_embeddings")


def weight_shape(config):
    """The fields of `config` that determine the pretrained weights (WEIGHT_FIELDS, plus RoPE's base under either
    of its spellings: `rope_theta` before transformers 5, `rope_parameters` since)."""
    d = config.to_dict()
    shape = {k: d.get(k) for k in WEIGHT_FIELDS}
    rope = d.get("rope_parameters") or {}
    shape["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    return shape


def weights_key(sequences, config, settings):
    """Hash of what determines the pretrained weights: the token sequences, the architecture (weight_shape) and the
    pretraining settings."""
    digest = hashlib.sha256(json.dumps([sequences, weight_shape(config), settings], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def batches(sequences, batch_size, rng):
    """Random batches of whole sequences, padded to the longest (they are short: no packing needed)."""
    order = list(range(len(sequences)))
    while True:
        rng.shuffle(order)
        for k in range(0, len(order) - batch_size + 1, batch_size):
            yield [sequences[i] for i in order[k:k + batch_size]]


def pad_batch(seqs, pad_id):
    """Token-id sequences -> (ids, attention mask), right-padded to the longest."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
    return ids, mask


def lm_loss(lm, ids, mask):
    """Mean next-token NLL over the real tokens."""
    logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


def pretrain(lm, sequences, pad_id, settings=SETTINGS, log=print):
    """Next-token training of `lm` on token-id `sequences`, in place (AdamW, warm-up then cosine)."""
    torch.manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    decay = [p for p in lm.parameters() if p.dim() >= 2]
    rest = [p for p in lm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=settings["lr"], betas=(0.9, 0.95))
    lm.train()
    steps, window = settings["steps"], []
    progress = Progress(steps, "tiny_lm pretraining")
    for step, seqs in zip(range(steps), batches(sequences, settings["batch_size"], rng)):
        warm = settings["warmup"]
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        for g in opt.param_groups:
            g["lr"] = settings["lr"] * scale
        loss = lm_loss(lm, *pad_batch(seqs, pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window = (window + [loss.item()])[-50:]
        progress.update(step + 1, f"lm loss {sum(window) / len(window):.4f}", final=step + 1 == steps)
    lm.eval()
    return lm


@torch.no_grad()
def answer_logprobs(lm, prompts, answers, pad_id, batch_size=128):
    """Sum of log p(answer tokens | prompt) for token-id prompt/answer lists (a pure LM's judgment of an answer)."""
    out = []
    for k in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[k:k + batch_size], answers[k:k + batch_size])]
        ids, mask = pad_batch(seqs, pad_id)
        logp = torch.log_softmax(lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for row, (p, a) in enumerate(zip(prompts[k:k + batch_size], answers[k:k + batch_size])):
            positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)
            out.append(logp[row, positions, torch.tensor(a)].sum().item())
    return out


def pretrained(sequences, config, pad_id, settings=SETTINGS, log=print, probe=None):
    """Path of the HF folder of `config`'s model pretrained on `sequences`; built once, then reused.
    probe(lm) -> dict of what the model knows, saved in the folder's pretrain.json and printed."""
    key = weights_key(sequences, config, settings)
    if shipped_key() == key:
        return SHIPPED
    path = os.path.join(CACHE, key)
    if os.path.exists(os.path.join(path, "pretrain.json")):
        return path
    def waiting(pid):
        log(f"[tiny_lm] another process (pid {pid}) is pretraining {path}; waiting for it to finish, then using its "
            "model")
    with files.build_lock(path, waiting):  # exactly one process builds it; the others wait here, then reuse it
        if not os.path.exists(os.path.join(path, "pretrain.json")):
            build(path, key, sequences, config, pad_id, settings, log, probe)
    return path


def build(path, key, sequences, config, pad_id, settings, log, probe):
    """Pretrain and write the HF folder at `path` (through a temporary folder and one rename)."""
    from transformers import LlamaForCausalLM
    n_tokens = sum(map(len, sequences))
    log(f"[tiny_lm] pretraining the tiny student on the world's text ({len(sequences)} texts, {n_tokens} tokens, "
        f"{settings['steps']} steps of {settings['batch_size']}); once, cached in {path}")
    torch.manual_seed(settings["seed"])
    lm = LlamaForCausalLM(copy.deepcopy(config))  # building a model edits its config
    t0 = time.time()
    pretrain(lm, sequences, pad_id, settings, log)
    info = {"key": key, "settings": settings, "texts": len(sequences), "tokens": n_tokens,
            "wall_s": round(time.time() - t0, 1), "knowledge": probe(lm) if probe else None}
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, BYTE_TOKENIZER), "w") as f:
        json.dump({"tokenizer": "bytes"}, f)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    files.fsync_tree(tmp)  # on the disk before the rename: a power cut cannot leave a renamed, empty folder
    shutil.rmtree(path, ignore_errors=True)  # a folder without pretrain.json is an interrupted build's
    files.replace(tmp, path)
    if info["knowledge"]:
        log("[tiny_lm] what the pretrained student knows: " + json.dumps(info["knowledge"]))


def shipped_key():
    try:
        with open(os.path.join(SHIPPED, "pretrain.json")) as f:
            return json.load(f)["key"]
    except (OSError, ValueError, KeyError):
        return None


def tiny_config(tokenizer, max_len):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(max_len, 1024),
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def world_sequences(tokenizer, pairs):
    """(prompt, answer) texts -> token ids as the student reads them: rendered prompt, answer, eos."""
    return [encode(tokenizer, render_prompt(tokenizer, as_messages(p, "world")) + render_answer(tokenizer, a))
            + [tokenizer.eos_token_id] for p, a in pairs]


def world_knowledge(tokenizer, world):
    """A probe of what an LM knows about the world: for every task and candidate style, does it give the correct
    answer a higher likelihood than a wrong one written the same way? Returns probe(lm) -> accuracy per family."""
    from demo import sim
    rng, rows = random.Random(0), []
    for task in sim.all_tasks(world):
        for style in sim.STYLES:
            variant = rng.randrange(4)
            rows.append((task.family, sim.render(task, task.answer, style, variant),
                         sim.render(task, sim.wrong_value(task, rng), style, variant), task.prompt))
    prompt = [encode(tokenizer, render_prompt(tokenizer, as_messages(r[3], "world"))) for r in rows]
    right, wrong = ([encode(tokenizer, render_answer(tokenizer, r[k])) + [tokenizer.eos_token_id] for r in rows]
                    for k in (1, 2))

    def probe(lm):
        good = answer_logprobs(lm, prompt, right, tokenizer.pad_token_id)
        bad = answer_logprobs(lm, prompt, wrong, tokenizer.pad_token_id)
        result = {}
        for fam in sim.FAMILIES:
            wins = [g > b for r, g, b in zip(rows, good, bad) if r[0] == fam]
            result[fam] = round(sum(wins) / len(wins), 4)
        result["all"] = round(sum(g > b for g, b in zip(good, bad)) / len(rows), 4)
        return {"correct_beats_wrong_same_style": result, "pairs": len(rows)}
    return probe


def tiny_backbone(world=None, log=print):
    """The HF folder of the tiny student pretrained on `world`'s text (sim.WorldConfig; default world if None)."""
    from demo import sim
    world, tokenizer = world or sim.WorldConfig(), ByteTokenizer()
    sequences = world_sequences(tokenizer, sim.world_corpus(world))
    return pretrained(sequences, tiny_config(tokenizer, 1024), tokenizer.pad_token_id, log=log,
                              probe=lambda lm: world_knowledge(tokenizer, world)(lm))  # built only if it pretrains


TINY_NAMES = ("tiny", "tiny-scratch")


def load_tiny(name, layers=0, max_len=1024):
    """--model=tiny (the student pretrained on the default world's text, built once) or tiny-scratch (random init)
    -> (causal LM, ByteTokenizer), like model.load_backbone."""
    from transformers import LlamaForCausalLM
    if name == "tiny":
        return load_backbone(tiny_backbone(log=functools.partial(print, flush=True)), layers, max_len)
    if name != "tiny-scratch":
        raise ValueError(f"load_tiny: {name!r} is not one of {TINY_NAMES}")
    tokenizer = ByteTokenizer()
    return cut_layers(LlamaForCausalLM(tiny_config(tokenizer, max_len)), layers), tokenizer


@dataclass
class RebuildConfig:
    threads: int = 1  # torch threads (one is faster than two on a loaded 2-core machine, measured ~4x)


def main(argv=None):
    """Rebuild the shipped default-world student (data/tiny-world-lm) with the code and settings as they are now."""
    cfg = parse_overrides(RebuildConfig(), sys.argv[1:] if argv is None else argv, "python -m demo.tiny_lm",
                          "Rebuild the shipped default-world tiny student (data/tiny-world-lm).")
    torch.set_num_threads(cfg.threads)
    shutil.rmtree(SHIPPED, ignore_errors=True)
    path = tiny_backbone()
    if path != SHIPPED:
        shutil.copytree(path, SHIPPED)
    print(f"shipped: {SHIPPED} (key {shipped_key()})")


if __name__ == "__main__":
    with one_line_errors():
        main()
