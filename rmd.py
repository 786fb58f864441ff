"""rmd: distil a reward model from a generative teacher LLM (RM-Distiller, see METHOD.md).

    python rmd.py distill [--key=value ...]   # teacher pipeline (teacher.py): prompts/pairs -> training pairs
    python rmd.py train   [--key=value ...]   # train the student reward model on those pairs
    python rmd.py eval --model DIR --data F   # accuracy on pairs, RewardBench or RM-Bench files (evaluate.py)
    python rmd.py bon --model DIR --data F    # best-of-N: every response's reward and the best one
    python rmd.py serve --model DIR           # HTTP reward server (OpenRLHF --remote_rm_url compatible)
    python rmd.py teacher-sim --port=N        # the built-in simulated teacher (sim.py), standalone

Every option is a field of a config dataclass below (TrainConfig for `train`); `--key=value` or `--key value`
overrides it, dashes or underscores, type-checked against the default. The whole config is printed and saved.

In Python:
    import rmd
    rmd.train(rmd.TrainConfig(data="pairs.jsonl", eval_data="test.jsonl", model="path/to/hf-model"))
    rm = rmd.load_reward_model("out/train/model")
    rm.score(["What is 2+2?"], ["4"])  # -> [reward]

The student is one causal-LM backbone with two heads: its pretrained LM head (kept, trained on the teacher's
answers) and a value head read at the last real token. Rows are packed into bins (several sequences per row,
block-diagonal attention via position ids), so one forward pass covers the chosen, rejected and teacher-answer
rows of a micro-batch with almost no padding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss import linear_cross_entropy, pairwise_loss
from teacher import answer_text, parse_dialogue, parse_overrides, read_jsonl_rows, split_implicit_prompt

ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    data: str = ""  # training JSONL (.jsonl or .jsonl.gz); several files comma-separated
    eval_data: str = ""  # held-out pairs: "file" or "name=file,name=file"
    holdout: int = 0  # also hold out the last N usable pairs of --data as the eval split "heldout"
    out: str = "out/train"  # where the model, checkpoints, log.jsonl and eval.json go
    model: str = "tiny"  # "tiny" (built-in config, byte tokenizer, from scratch) or a local HF causal-LM folder/.gguf
    layers: int = 0  # keep only the first N transformer layers of the backbone (0 = all)
    head: str = "mlp"  # value head: "mlp" (dropout, Linear(H,1024), ReLU, Linear(1024,1)) or "linear"
    dropout: float = 0.1  # value-head dropout
    loss: str = "mse"  # pairwise loss: mse (margin regression), bt-margin, bt
    lm_weight: float = 0.1  # lambda of the LM term on the teacher answers (0 = off)
    max_len: int = 1024  # tokens per sequence; longer ones are cut from the left of the prompt
    batch_size: int = 16  # pairs per optimizer step, over all processes and micro-batches
    micro_batch: int = 0  # pairs per forward pass per process (0 = batch_size / processes)
    lr: float = 1e-5
    min_lr: float = 0.0  # cosine decays to this
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of steps with linear warm-up
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0 = run the epochs)
    grad_clip: float = 1.0  # 0 = off
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16
    compile: str = "auto"  # torch.compile the forward: auto (on for CUDA, off on CPU), on, off
    log_interval: int = 10
    eval_interval: int = 0  # evaluate every N steps (0 = only at the end)
    save_interval: int = 0  # checkpoint every N steps (0 = only at the end)
    eval_batch: int = 32  # pairs per forward pass at evaluation
    resume: bool = False  # continue from <out>/ckpt
    # shard parameters, gradients and optimizer state over processes with FSDP2 fully_shard: each transformer layer
    # and the root; for models too big for one GPU; needs torchrun (a single process trains unsharded)
    fsdp: bool = False


def validate(cfg: TrainConfig):
    choices = {"head": ("mlp", "linear"), "loss": ("mse", "bt-margin", "bt"), "compile": ("auto", "on", "off"),
               "dtype": ("auto", "float32", "bfloat16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"error: --{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.batch_size < 1 or cfg.max_len < 8 or cfg.lm_weight < 0:
        raise SystemExit("error: need --batch-size >= 1, --max-len >= 8, --lm-weight >= 0")


# ----------------------------------------------------------------------------------------------------------------
# data: rows -> prompt messages + answers -> token ids


class DataError(ValueError):
    pass


def as_messages(prompt, where):
    if isinstance(prompt, str):
        return parse_dialogue(prompt) or [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of "
                    "{role, content} messages")


def number(row, key, where):
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{key}' must be a finite number, got {value!r}")
    return float(value)


def parse_row(row, where, need_margin):
    """One JSONL object -> (messages, chosen, rejected, margin, teacher_response)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (rows need prompt, chosen, rejected)")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = row["prompt"]
    else:
        try:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise DataError(f"{where}: no 'prompt' field and chosen/rejected share no prompt prefix")
    messages = as_messages(prompt, where)
    chosen, rejected = answer_text(chosen), answer_text(rejected)
    if chosen is None or rejected is None:
        bad = "chosen" if chosen is None else "rejected"
        raise DataError(f"{where}: field '{bad}' must be a string or a message list ending in an assistant message")
    margin = None
    if "margin" in row:
        margin = number(row, "margin", where)
    elif "chosen_score" in row or "rejected_score" in row:
        margin = number(row, "chosen_score", where) - number(row, "rejected_score", where)
    if need_margin and margin is None:
        raise DataError(f"{where}: this loss needs a preference strength: give chosen_score and rejected_score, "
                        "or margin (or train with --loss=bt)")
    teacher = row.get("teacher_response")
    if teacher is not None and not isinstance(teacher, str):
        raise DataError(f"{where}: field 'teacher_response' must be a string")
    return messages, chosen, rejected, margin, teacher


class ByteTokenizer:
    """The built-in tiny student's tokenizer: UTF-8 bytes, plus pad and eos. Needs no files."""
    pad_token_id, eos_token_id, vocab_size = 256, 257, 260
    chat_template = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode(tokenizer, text):
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, messages):
    """Prompt messages -> the text the student sees before its answer (identical at train and eval time)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"\n\n{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in messages) \
        + "\n\nAssistant:"


def render_answer(tokenizer, answer):
    return answer.strip() if getattr(tokenizer, "chat_template", None) else " " + answer.strip()


@dataclass
class Example:
    prompt: tuple  # (prompt ids of the chosen row, of the rejected row): cut to fit each row
    chosen: list  # answer token ids, eos included
    rejected: list
    margin: float | None
    teacher: tuple | None  # (prompt ids, teacher answer ids with eos): the LM target


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    prompt_cut: int = 0  # sequences whose prompt lost tokens from the left
    answer_cut: int = 0  # sequences whose answer alone was over-long (start of the answer cut)
    dropped: dict = field(default_factory=dict)  # reason -> count

    def drop(self, reason):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self, name):
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        return (f"{name}: {self.rows} rows, {self.kept} kept; cut: {self.prompt_cut} prompts (from the left), "
                f"{self.answer_cut} answers (from the start); dropped: {drops}")


def fit(prompt, answer, max_len, stats):
    """Cut an over-long sequence from the left of the prompt, keeping the end of the answer and its eos."""
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer
    stats.prompt_cut += 1
    keep = max_len - len(answer)
    if keep >= 1:
        return prompt[len(prompt) - keep:], answer
    stats.answer_cut += 1
    return prompt[-1:], answer[len(answer) - (max_len - 1):]


def tokenize_example(tokenizer, parsed, max_len, stats):
    messages, chosen, rejected, margin, teacher = parsed
    eos = [tokenizer.eos_token_id]
    prompt = encode(tokenizer, render_prompt(tokenizer, messages))
    chosen_ids = encode(tokenizer, render_answer(tokenizer, chosen)) + eos
    rejected_ids = encode(tokenizer, render_answer(tokenizer, rejected)) + eos
    if chosen_ids == rejected_ids:
        stats.drop("chosen == rejected")
        return None
    p_c, chosen_ids = fit(prompt, chosen_ids, max_len, stats)
    p_r, rejected_ids = fit(prompt, rejected_ids, max_len, stats)
    if p_c + chosen_ids == p_r + rejected_ids:
        stats.drop("identical after cutting to max_len")
        return None
    teacher_pair = None
    if teacher and teacher.strip():
        answer = encode(tokenizer, render_answer(tokenizer, teacher)) + eos
        if len(answer) > max_len - 1:
            stats.answer_cut += 1  # an LM target keeps its beginning: the continuation of the prompt
            answer = answer[:max_len - 1]
        teacher_pair = fit(prompt, answer, max_len, stats)
    return Example(prompt=(p_c, p_r), chosen=chosen_ids, rejected=rejected_ids, margin=margin,
                   teacher=teacher_pair)


def load_pairs(paths, tokenizer, max_len, need_margin=False, name="data"):
    """JSONL file(s) -> tokenized Examples and the DataStats of what was cut or dropped."""
    stats, examples = DataStats(), []
    for path in paths.split(","):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        try:
            rows = list(read_jsonl_rows(path))
        except ValueError as e:
            raise DataError(str(e)) from None
        for line_no, row in rows:
            stats.rows += 1
            example = tokenize_example(tokenizer, parse_row(row, f"{path}:{line_no}", need_margin), max_len, stats)
            if example is not None:
                examples.append(example)
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"{paths}: no usable pairs ({stats.summary(name)})")
    return examples, stats


# ----------------------------------------------------------------------------------------------------------------
# batching: examples -> packed bins


def pack(sequences, bin_len):
    """First-fit-decreasing packing of sequences into bins of bin_len tokens. Returns a list of bins (index lists)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    bins, space = [], []
    for i in order:
        n = len(sequences[i])
        slot = next((b for b in range(len(bins)) if space[b] >= n), None)
        if slot is None:
            bins.append([]), space.append(bin_len)
            slot = len(bins) - 1
        bins[slot].append(i)
        space[slot] -= n
    return bins


def pack_tightly(sequences, target_padding=0.05):
    """Bins as long as the longest sequence keep attention as cheap as plain padding; when that leaves more than
    target_padding of the slots empty, longer bins (up to 2x) fill better. Shortest bins that reach the target win."""
    longest, total = max(map(len, sequences)), sum(map(len, sequences))
    best = None
    for scale in (1 + k / 16 for k in range(17)):
        bins = pack(sequences, int(longest * scale))
        padding = 1 - total / (len(bins) * max(sum(len(sequences[i]) for i in b) for b in bins))
        if best is None or padding < best[0]:
            best = (padding, bins)
        if padding <= target_padding:
            break
    return best[1]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [bins, bin_len]
    position_ids: torch.Tensor  # restart at 0 for every packed sequence (block-diagonal attention)
    last: torch.Tensor  # flat index of each reward row's last token: chosen rows, then rejected rows
    lm_index: torch.Tensor  # flat indices of positions that predict a teacher-answer token
    lm_target: torch.Tensor  # the teacher-answer tokens they predict
    margins: torch.Tensor | None
    n_pairs: int
    real_tokens: int


def collate(examples, pad_id, use_lm, with_margins):
    """One forward pass worth of examples: chosen, rejected and teacher-answer rows packed together."""
    sequences, lm_starts = [], {}
    for ex in examples:
        sequences += [ex.prompt[0] + ex.chosen, ex.prompt[1] + ex.rejected]
    for ex in examples if use_lm else []:
        if ex.teacher is not None:
            lm_starts[len(sequences)] = len(ex.teacher[0])
            sequences.append(ex.teacher[0] + ex.teacher[1])
    bins = pack_tightly(sequences)
    bin_len = max(sum(len(sequences[i]) for i in b) for b in bins)
    input_ids = torch.full((len(bins), bin_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), bin_len), dtype=torch.long)
    last, lm_index, lm_target = [0] * (2 * len(examples)), [], []
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            ids = sequences[i]
            input_ids[b, offset:offset + len(ids)] = torch.tensor(ids)
            position_ids[b, offset:offset + len(ids)] = torch.arange(len(ids))
            flat = b * bin_len + offset
            if i < 2 * len(examples):  # chosen row of example e is 2e, rejected 2e+1
                last[i // 2 + (len(examples) if i % 2 else 0)] = flat + len(ids) - 1
            else:  # position t predicts token t+1: the answer tokens from lm_starts[i] on
                start = lm_starts[i]
                lm_index.extend(range(flat + start - 1, flat + len(ids) - 1))
                lm_target.extend(ids[start:])
            offset += len(ids)
        # trailing padding: one more "sequence" of its own, invisible to the others
        position_ids[b, offset:] = torch.arange(bin_len - offset)
    margins = None
    if with_margins:
        margins = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    return Batch(input_ids, position_ids, torch.tensor(last), torch.tensor(lm_index, dtype=torch.long),
                 torch.tensor(lm_target, dtype=torch.long), margins, len(examples),
                 sum(len(s) for s in sequences))


def epoch_batches(examples, batch_size, seed, epoch):
    """Deterministic order of one epoch: shuffle, group by length within windows, shuffle the groups."""
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(examples[i].prompt[0]) + len(examples[i].chosen)
                       + len(examples[i].rejected))
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# the student: backbone + LM head + value head


def tiny_config(tokenizer, max_len):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(max_len, 1024),
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def load_backbone(name, layers=0, max_len=1024):
    """'tiny' or a local HF causal-LM folder (or a .gguf file) -> (causal LM, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    if name == "tiny":
        tokenizer = ByteTokenizer()
        lm = LlamaForCausalLM(tiny_config(tokenizer, max_len))
    else:
        folder, gguf = name, {}
        if name.endswith(".gguf"):
            folder, gguf = os.path.dirname(name) or ".", {"gguf_file": os.path.basename(name)}
        elif os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
            ggufs = [f for f in os.listdir(name) if f.endswith(".gguf")]
            gguf = {"gguf_file": ggufs[0]} if len(ggufs) == 1 else {}
        if not os.path.isdir(folder):
            raise SystemExit(f"error: --model {name!r} is not 'tiny', a local model folder or a .gguf file")
        tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
    if layers:
        lm.model.layers = lm.model.layers[:layers]
        lm.config.num_hidden_layers = len(lm.model.layers)
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[:layers]
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {name!r} has no eos token")
    return lm, tokenizer


class RewardModel(nn.Module):
    """A causal LM whose backbone also feeds a value head; reward = value head(hidden state of the last token)."""

    def __init__(self, lm, tokenizer, head="mlp", dropout=0.1):
        super().__init__()
        self.lm, self.tokenizer, self.head_kind = lm, tokenizer, head
        hidden = lm.config.hidden_size
        if head == "mlp":
            self.value_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1024), nn.ReLU(),
                                            nn.Linear(1024, 1))
        else:
            self.value_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1, bias=False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def hidden(self, input_ids, position_ids=None, attention_mask=None):
        return self.lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state

    def forward(self, batch: Batch):
        """Packed batch -> (rewards [2B]: chosen then rejected, hidden states of LM positions [n, H])."""
        hidden = self.hidden(batch.input_ids, batch.position_ids).flatten(0, 1)
        rewards = self.value_head(hidden[batch.last]).squeeze(-1).float()
        return rewards, hidden[batch.lm_index]

    def rewards(self, input_ids, attention_mask):
        """Padded batch (either padding side) -> reward at each row's last real token."""
        attention_mask = attention_mask.long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.hidden(input_ids, position_ids, attention_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask * positions).argmax(-1)
        return self.value_head(hidden[torch.arange(len(last)), last]).squeeze(-1).float()

    def tokens(self, prompt, answer, max_len=None):
        """(prompt, answer) -> token ids exactly as training builds them: rendered prompt + answer + eos, cut."""
        eos = [self.tokenizer.eos_token_id]
        prompt_ids = encode(self.tokenizer, render_prompt(self.tokenizer, as_messages(prompt, "prompt")))
        answer_ids = encode(self.tokenizer, render_answer(self.tokenizer, answer)) + eos
        p, a = fit(prompt_ids, answer_ids, max_len or self.max_len, DataStats())
        return p + a

    @torch.no_grad()
    def sequence_rewards(self, sequences, batch_size=32, padding_side="right"):
        """Rewards of token-id sequences, in input order; batched by length so little padding is computed."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = [0.0] * len(sequences)
        for k in range(0, len(order), batch_size):
            chunk = order[k:k + batch_size]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                span = slice(width - len(sequences[i]), width) if padding_side == "left" else \
                    slice(0, len(sequences[i]))
                ids[row, span], mask[row, span] = torch.tensor(sequences[i]), 1
            for i, reward in zip(chunk, self.rewards(ids.to(device), mask.to(device)).tolist()):
                out[i] = reward
        self.train(was_training)
        return out

    def score(self, prompts, answers, batch_size=32, max_len=None, padding_side="right"):
        """Rewards for (prompt, answer) pairs; prompts are strings or message lists, as in the training data."""
        sequences = [self.tokens(p, a, max_len) for p, a in zip(prompts, answers, strict=True)]
        return self.sequence_rewards(sequences, batch_size, padding_side)

    max_len = 1024


# ----------------------------------------------------------------------------------------------------------------
# saving and loading (safetensors only)


def export_pad_id(tokenizer, vocab_rows):
    """A pad id that never occurs in a real sequence: HF's sequence-classification head reads the reward at the
    rightmost token that is not config.pad_token_id, so pad == eos (answers end with eos) would read the wrong one.
    Keeps the tokenizer's pad if it is distinct from eos; else an unused special token; else a spare embedding row."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return pad
    probe = [{"role": "user", "content": "hi"}]
    used = set(encode(tokenizer, render_prompt(tokenizer, probe) + render_answer(tokenizer, "ok"))) | {eos}
    used.add(getattr(tokenizer, "bos_token_id", None))
    special = list(getattr(tokenizer, "all_special_ids", [])) + sorted(getattr(tokenizer, "added_tokens_decoder", {}))
    spare = [i for i in special if i not in used]
    if spare:
        return spare[0]
    return len(tokenizer) if vocab_rows > len(tokenizer) else None


def save_reward_model(model: RewardModel, path, cfg: TrainConfig, weights=None):
    """Safetensors folder for load_reward_model. With the linear head it is also a standard HF sequence classifier:
    AutoModelForSequenceClassification.from_pretrained(path) gives the same rewards (the value head is `score.weight`
    in model.safetensors; the config's pad_token_id never occurs in real text, see export_pad_id; feed it what rmd
    feeds: rendered prompt + answer + eos). The LM head stays in the folder for load_reward_model (HF warns that it
    is unused)."""
    import copy
    from safetensors.torch import load_file, save_file
    os.makedirs(path, exist_ok=True)
    quantizer = getattr(model.lm, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":  # GGUF weights were dequantized to float when loaded
        model.lm.hf_quantizer = None  # else save_pretrained refuses ("quantized with gguf, not serializable")
        if getattr(model.lm.config, "quantization_config", None) is not None:
            del model.lm.config.quantization_config
    # weights: under FSDP, full_state(model), gathered by every process (the model's own tensors are shards)
    lm_weights = None if weights is None else {k[3:]: v for k, v in weights.items() if k.startswith("lm.")}
    model.lm.save_pretrained(path, safe_serialization=True, state_dict=lm_weights)
    weights = model.state_dict() if weights is None else weights
    head = {k[11:]: v.detach().contiguous().cpu() for k, v in weights.items() if k.startswith("value_head.")}
    save_file(head, os.path.join(path, "value_head.safetensors"))
    tokenizer, hf_export = model.tokenizer, None
    if model.head_kind == "linear":
        pad = export_pad_id(tokenizer, model.lm.get_input_embeddings().weight.shape[0])
        arch = type(model.lm).__name__.replace("ForCausalLM", "ForSequenceClassification")
        import transformers
        if pad is not None and hasattr(transformers, arch):
            weights = os.path.join(path, "model.safetensors")
            if os.path.exists(weights):
                tensors = load_file(weights)
                tensors["score.weight"] = head["1.weight"]
                save_file(tensors, weights, metadata={"format": "pt"})
            else:  # sharded: the score in a file of its own, listed in the index
                save_file({"score.weight": head["1.weight"]}, os.path.join(path, "score.safetensors"),
                          metadata={"format": "pt"})
                with open(os.path.join(path, "model.safetensors.index.json")) as f:
                    index = json.load(f)
                index["weight_map"]["score.weight"] = "score.safetensors"
                with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                    json.dump(index, f, indent=2)
            config = copy.deepcopy(model.lm.config)
            config.architectures, config.num_labels, config.pad_token_id = [arch], 1, pad
            config.save_pretrained(path)
            hf_export = {"architecture": arch, "pad_token_id": pad}
            if not isinstance(tokenizer, ByteTokenizer) and tokenizer.pad_token_id != pad:
                tokenizer = copy.deepcopy(tokenizer)  # so that tokenizer(..., padding=True) pads with that id
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer.save_pretrained(path)
    meta = {"head": model.head_kind, "dropout": cfg.dropout, "max_len": cfg.max_len,
            "tokenizer": "bytes" if isinstance(model.tokenizer, ByteTokenizer) else "hf", "format": "rmd-1",
            "hf_sequence_classification": hf_export}
    with open(os.path.join(path, "rmd.json"), "w") as f:
        json.dump(meta, f, indent=2)


def load_reward_model(path, device="cpu") -> RewardModel:
    """A reward-model folder written by `rmd.py train` -> RewardModel (eval mode) with .score(prompts, answers)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    meta_path = os.path.join(path, "rmd.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path}: not an rmd reward-model folder (no rmd.json)")
    with open(meta_path) as f:
        meta = json.load(f)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = ByteTokenizer() if meta["tokenizer"] == "bytes" else AutoTokenizer.from_pretrained(path)
    model = RewardModel(lm, tokenizer, head=meta["head"], dropout=meta["dropout"])
    model.value_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
    model.max_len = meta["max_len"]
    return model.to(device).eval()


def param_names(model, optimizer):
    """The optimizer's parameters by name, in its order: the names FSDP's state-dict functions key them by."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model, optimizer=None):
    """FSDP: the unsharded weights (and optimizer state) on CPU, in rank 0's hands (empty on the others). Every
    process must call it: the shards are gathered with collectives. Tied weights appear once, under one name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    weights = {k: v for k, v in weights.items() if k in own}  # named_parameters lists a tied weight once
    if optimizer is None:
        return weights
    opt = get_optimizer_state_dict(model, optimizer, options=options)
    index = {name: i for i, name in enumerate(param_names(model, optimizer))}  # the unsharded checkpoint's ids
    opt = {"state": {index[name]: s for name, s in opt.get("state", {}).items()},
           "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in opt.get("param_groups", [])]}
    return weights, opt


def save_checkpoint(path, model, optimizer, state, full=None):
    """Everything --resume needs: weights, AdamW moments, RNG and data position. Written to a temp dir, then swapped.
    Under FSDP, full = full_state(model, optimizer), gathered by every process; the files are the same either way."""
    import shutil
    from safetensors.torch import save_file, save_model
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way: start clean
    os.makedirs(tmp)
    if full:
        save_file({k: v.contiguous() for k, v in full[0].items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        save_model(model, os.path.join(tmp, "model.safetensors"))
    opt = full[1] if full else optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "state.json.part"), "w") as f:  # state.json last: its presence marks a whole copy
        json.dump({**state, "param_groups": opt["param_groups"], "rng_python": random.getstate()}, f)
    os.replace(os.path.join(tmp, "state.json.part"), os.path.join(tmp, "state.json"))
    # Every kill point leaves a whole copy that checkpoint_dir finds: path, or (between the renames) tmp and old.
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)  # left by a kill before its removal; path is whole here
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(path):
    """The folder --resume loads: `path`, or after a save killed between its two renames the whole copy beside
    it (path.tmp, the newer, else path.old); None if there is none. Reads only, so every process may call it."""
    for candidate in (path, path + ".tmp", path + ".old"):
        try:
            with open(os.path.join(candidate, "state.json")) as f:
                json.load(f)
            return candidate
        except (OSError, ValueError):
            continue
    return None


def truncate_log(path, step):
    """Keep only log.jsonl records up to `step` (those after it are repeated by the resumed run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, AttributeError):
            pass  # a line torn by a kill
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def load_checkpoint(path, model, optimizer, sharded=False):
    """Restore save_checkpoint's files; sharded: into an FSDP model and its optimizer (every process calls it)."""
    from safetensors.torch import load_file, load_model
    if sharded:  # each process reads the full tensors and keeps its own shard
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        weights = load_file(os.path.join(path, "model.safetensors"))
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        load_model(model, os.path.join(path, "model.safetensors"))
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    opt_state = {}
    for key, value in tensors.items():
        if not key.startswith("rng."):
            i, name = key.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = value
    opt = {"state": opt_state, "param_groups": state.pop("param_groups")}
    if sharded:  # FSDP's functions key the state by parameter name
        names = param_names(model, optimizer)
        opt = {"state": {names[i]: s for i, s in opt_state.items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, opt, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = state.pop("rng_python")
    random.setstate((version, tuple(internal), gauss))
    return state


# ----------------------------------------------------------------------------------------------------------------
# evaluation and training


@torch.no_grad()
def evaluate(model, examples, batch_pairs, device, autocast):
    """Pair accuracy: the fraction of pairs with r(chosen) > r(rejected); a tie counts as wrong."""
    was_training = model.training
    model.eval()
    correct = 0
    for k in range(0, len(examples), batch_pairs):
        batch = to_device(collate(examples[k:k + batch_pairs], model.pad_id, False, False), device)
        with autocast:
            rewards, _ = model(batch)
        correct += (rewards[:batch.n_pairs] > rewards[batch.n_pairs:]).sum().item()
    model.train(was_training)
    return correct / len(examples)


def to_device(batch, device):
    return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})


def lr_at(step, total, cfg):
    warmup = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def step_loss(model, batch, cfg, pairs_in_step, lm_tokens_in_step):
    """Loss of one micro-batch, scaled so the sum over a step's micro-batches and processes is the step's mean."""
    rewards, lm_hidden = model(batch)
    chosen, rejected = rewards[:batch.n_pairs], rewards[batch.n_pairs:]
    pair = pairwise_loss(chosen, rejected, batch.margins, kind=cfg.loss) * (batch.n_pairs / pairs_in_step)
    lm = torch.zeros((), device=rewards.device)
    if cfg.lm_weight > 0 and len(batch.lm_target):
        weight = getattr(model, "module", model).lm.get_output_embeddings().weight  # model may be DDP-wrapped
        lm = linear_cross_entropy(lm_hidden, weight, batch.lm_target) * (len(batch.lm_target) / lm_tokens_in_step)
    correct = (chosen.detach() > rejected.detach()).sum()
    return pair, lm, correct


def setup_distributed(cfg):
    """DDP from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    return rank, world, device


def train(cfg: TrainConfig, stop_after: int = 0):
    """Train a reward model; returns the final eval metrics ({split: accuracy}).

    stop_after > 0 checkpoints and returns {} after that step, as if the run had been cut there (for tests)."""
    validate(cfg)
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    lm, tokenizer = load_backbone(cfg.model, cfg.layers, cfg.max_len)
    model = RewardModel(lm, tokenizer, cfg.head, cfg.dropout).to(device)
    model.max_len = cfg.max_len
    log("config: " + json.dumps(dataclasses.asdict(cfg)))

    examples, stats = load_pairs(cfg.data, tokenizer, cfg.max_len, need_margin=cfg.loss != "bt", name="train")
    log(stats.summary("train"))
    eval_sets = {}
    for spec in filter(None, cfg.eval_data.split(",")):
        name, _, path = spec.rpartition("=")
        eval_sets[name or "eval"], eval_stats = load_pairs(path, tokenizer, cfg.max_len, name=name or "eval")
        log(eval_stats.summary(name or "eval"))
    if cfg.holdout:
        if cfg.holdout >= len(examples):
            raise SystemExit(f"error: --holdout {cfg.holdout} leaves no training pairs ({len(examples)} usable)")
        examples, eval_sets["heldout"] = examples[:-cfg.holdout], examples[-cfg.holdout:]
        log(f"holding out the last {cfg.holdout} pairs of --data as eval split 'heldout'")
    use_lm = cfg.lm_weight > 0
    if use_lm and not any(ex.teacher for ex in examples):
        raise SystemExit("error: --lm-weight > 0 but no training row has a 'teacher_response' (or use --lm-weight=0)")

    micro = cfg.micro_batch or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise SystemExit(f"error: --batch-size {cfg.batch_size} must be a multiple of --micro-batch x processes "
                         f"({micro} x {world})")
    accum = cfg.batch_size // (micro * world)
    steps_per_epoch = len(examples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(examples)} usable pairs is fewer than one batch of {cfg.batch_size}")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    leftover = len(examples) - steps_per_epoch * cfg.batch_size
    log(f"{len(examples)} pairs, {steps_per_epoch} steps per epoch ({leftover} pairs left over per epoch, reshuffled "
        f"next epoch), {total} steps; {world} process(es) x {accum} micro-batch(es) x {micro} pairs")

    cuda = "cuda" in str(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=dtype == "bfloat16")
    sharded = cfg.fsdp and world > 1
    if sharded:  # before the optimizer is built: fully_shard swaps each parameter for this process's DTensor shard
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        bf16 = cuda and dtype == "bfloat16"  # bf16 weights in the forward, fp32 gradient reduction
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for layer in model.lm.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embeddings, LM head, value head
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=True if not sharded else (cuda or None))  # fused: 4x faster step on CPU too
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    step = 0
    if cfg.resume:
        found = checkpoint_dir(ckpt_dir)
        if found is None:
            raise SystemExit(f"error: --resume but no checkpoint in {ckpt_dir}")
        step = load_checkpoint(found, model, optimizer, sharded)["step"]
        log(f"resumed from {found} at step {step}")
        if master:
            truncate_log(os.path.join(cfg.out, "log.jsonl"), step)
    forward_model = model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP
        forward_model = DDP(model, device_ids=[device] if cuda else None, find_unused_parameters=use_lm is False)
    if cfg.compile == "on" or (cfg.compile == "auto" and cuda):
        forward_model = torch.compile(forward_model)
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    log_file = open(os.path.join(cfg.out, "log.jsonl"), "a") if master else None

    def evaluate_all():
        return {name: evaluate(model, data, cfg.eval_batch, device, autocast) for name, data in eval_sets.items()}

    model.train()
    window = {"pair": 0.0, "lm": 0.0, "correct": 0, "pairs": 0, "tokens": 0, "slots": 0, "time": 0.0, "steps": 0}
    while step < total:
        t0 = time.perf_counter()
        epoch, index = divmod(step, steps_per_epoch)
        step_examples = [examples[i] for i in epoch_batches(examples, cfg.batch_size, cfg.seed, epoch)[index]]
        lm_tokens = sum(len(ex.teacher[1]) for ex in step_examples if ex.teacher) if use_lm else 0
        mine = step_examples[rank * micro * accum:(rank + 1) * micro * accum]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # pair loss, lm loss, correct, pairs
        for k in range(accum):
            batch = to_device(collate(mine[k * micro:(k + 1) * micro], model.pad_id, use_lm, cfg.loss != "bt"),
                              device)
            sync = world == 1 or k == accum - 1
            no_sync = not sync and hasattr(forward_model, "no_sync")
            with forward_model.no_sync() if no_sync else contextlib.nullcontext():
                with autocast:
                    pair, lm, correct = step_loss(forward_model, batch, cfg, cfg.batch_size, max(1, lm_tokens))
                (pair + cfg.lm_weight * lm).mul(world).backward()  # DDP averages over processes; we want the sum
            # kept on the device: one host sync per step (at the all-reduce / tolist), not per micro-batch
            totals += torch.stack([pair.detach().double(), lm.detach().double(), correct.double(),
                                   totals.new_tensor(batch.n_pairs)])
            window["tokens"] += batch.real_tokens
            window["slots"] += batch.input_ids.numel()
        if world > 1:  # the step's loss over all processes, not rank 0's share
            torch.distributed.all_reduce(totals)
        for key, value in zip(("pair", "lm", "correct", "pairs"), totals.tolist()):
            window[key] += int(value) if key in ("correct", "pairs") else value
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window["time"] += time.perf_counter() - t0
        window["steps"] += 1
        if step % cfg.log_interval == 0 or step == total:
            log_line(window, step, total, optimizer, world, log, log_file)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total and eval_sets:
            log(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluate_all().items()))
        if step in (total, stop_after) or (cfg.save_interval and step % cfg.save_interval == 0):
            full = full_state(model, optimizer) if sharded else None  # all processes gather, rank 0 writes
            if master:
                save_checkpoint(ckpt_dir, model, optimizer, {"step": step, "config": dataclasses.asdict(cfg)}, full)
        if step == stop_after:
            return {}
    metrics = evaluate_all()
    weights = full_state(model) if sharded else None
    if master:
        save_reward_model(model, os.path.join(cfg.out, "model"), cfg, weights)
        result = {"step": step, "accuracy": metrics, "train_data": dataclasses.asdict(stats),
                  "eval_pairs": {k: len(v) for k, v in eval_sets.items()}}
        with open(os.path.join(cfg.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        log("final eval: " + (", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no --eval-data given"))
        log(f"model: {os.path.join(cfg.out, 'model')}  checkpoint: {ckpt_dir}  metrics: "
            f"{os.path.join(cfg.out, 'eval.json')}")
        log_file.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return metrics


def log_line(window, step, total, optimizer, world, log, log_file):
    """One line per interval: step, loss parts, accuracy, lr, tokens/s, padding %, ms/step; then reset the window."""
    steps = window["steps"]
    record = {"step": step, "pair_loss": window["pair"] / steps, "lm_loss": window["lm"] / steps,
              "accuracy": window["correct"] / max(1, window["pairs"]), "lr": optimizer.param_groups[0]["lr"],
              "tokens_per_s": window["tokens"] * world / window["time"],
              "padding": 1 - window["tokens"] / max(1, window["slots"]), "ms_per_step": 1000 * window["time"] / steps}
    log(f"step {step}/{total} | pair {record['pair_loss']:.4f} | lm {record['lm_loss']:.4f} | "
        f"acc {record['accuracy']:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s | "
        f"pad {100 * record['padding']:.1f}% | {record['ms_per_step']:.0f} ms/step")
    if log_file:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    for key in window:
        window[key] = 0 if isinstance(window[key], int) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# command line


USAGE = __doc__
DEMO_OUT = "out/distill"  # where `python rmd.py distill` writes when run on the built-in default
# `python rmd.py train` with no --data: the built-in tiny student on the demo distill output, sized for a CPU
DEMO_TRAIN = dict(data=f"{DEMO_OUT}/train.jsonl", eval_data=f"normal={DEMO_OUT}/builtin/normal.jsonl,"
                  f"hard={DEMO_OUT}/builtin/hard.jsonl", model="tiny", lr=1e-3, max_len=256, max_steps=200,
                  log_interval=25)


def distill_command(argv):
    """`rmd.py distill`: teacher.distill, or with no --teacher-url the simulated teacher on the built-in prompts."""
    import teacher
    cfg = parse_overrides(teacher.DistillConfig(out=DEMO_OUT), argv)
    if cfg.teacher_url:
        return teacher.distill(cfg)
    import sim
    world = sim.WorldConfig(seed=cfg.seed)
    paths = sim.write_builtin_data(os.path.join(cfg.out, "builtin"), world)
    url, shutdown = sim.start_server(world)
    print(f"no --teacher-url: using the built-in simulated teacher at {url} (sim.py) on the built-in prompts "
          f"({paths['distill']}); held-out eval splits in {os.path.dirname(paths['normal'])}", file=sys.stderr)
    try:
        return teacher.distill(dataclasses.replace(cfg, teacher_url=url, teacher_model=sim.TEACHER_MODEL,
                                                   data=cfg.data or paths["distill"]))
    finally:
        shutdown()


def train_command(argv):
    demo = not any(a.replace("_", "-").startswith("--data") for a in argv)
    cfg = parse_overrides(TrainConfig(**DEMO_TRAIN) if demo else TrainConfig(), argv)
    if demo and not os.path.exists(cfg.data):
        raise SystemExit(f"error: no --data given and no demo data at {cfg.data}: run `python rmd.py distill` "
                         "first, or pass --data=pairs.jsonl (rows {prompt, chosen, rejected[, chosen_score, "
                         "rejected_score, teacher_response]}; see README.md)")
    try:
        return train(cfg)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        train_command(rest)
    elif command == "distill":
        distill_command(rest)
    elif command == "teacher-sim":
        import sim
        return sim.main(rest)
    elif command in ("eval", "bon", "serve"):
        import evaluate
        {"eval": evaluate.eval_command, "bon": evaluate.bon_command, "serve": evaluate.serve_command}[command](rest)
    else:
        raise SystemExit(f"error: unknown command {command!r}; commands: distill, train, eval, bon, serve, "
                         "teacher-sim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
