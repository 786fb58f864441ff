"""rmd: distil a reward model from a generative teacher LLM (RM-Distiller, see METHOD.md).

    python rmd.py distill [--key=value ...]   # teacher pipeline (teacher.py): prompts/pairs -> training pairs
    python rmd.py train   [--key=value ...]   # train the student reward model on those pairs
    python rmd.py eval --model DIR --data F   # accuracy on pairs, RewardBench or RM-Bench files (evaluate.py)
    python rmd.py bon --model DIR --data F    # best-of-N: every response's reward and the best one
    python rmd.py serve --model DIR           # HTTP reward server (OpenRLHF --remote_rm_url compatible)
    python rmd.py teacher-sim --port=N        # the built-in simulated teacher (sim.py), standalone

Every option is a field of a config dataclass below (TrainConfig for `train`); `--key=value` or `--key value`
overrides it, dashes or underscores, type-checked against the default. The whole config is printed and saved.
`python rmd.py COMMAND --help` lists a command's options with type, default and meaning (the field comments).
A mistake (a bad row, a missing file, a wrong option, an unreachable teacher) is one line starting with `error:`.

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
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss import linear_cross_entropy, pairwise_loss
from teacher import (FatalError, TransportError, answer_text, check_messages, message_text, parse_dialogue,
                     parse_overrides, read_jsonl_rows, split_implicit_prompt)

ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    data: str = ""  # training data (.jsonl, .jsonl.gz, a .json array or .parquet); several files comma-separated
    eval_data: str = ""  # held-out pairs: "file" or "name=file,name=file"
    holdout: int = 0  # also hold out the last N usable pairs of --data as the eval split "heldout"
    out: str = "out/train"  # where the model, checkpoints, log.jsonl and eval.json go
    model: str = "tiny"  # "tiny" (built-in, pretrained on the sim world), "tiny-scratch", or an HF folder/.gguf
    layers: int = 0  # keep only the first N transformer layers of the backbone (0 = all)
    head: str = "mlp"  # value head: "mlp" (dropout, Linear(H,1024), ReLU, Linear(1024,1)) or "linear"
    dropout: float = 0.1  # value-head dropout
    loss: str = "mse"  # pairwise loss: mse (margin regression), bt-margin, bt
    lm_weight: float = 0.1  # lambda of the LM term on the teacher answers (0 = off); 0.1 chosen on valid (README)
    max_len: int = 1024  # tokens per sequence; longer ones keep the prompt's end, then the answer's start (see fit)
    batch_size: int = 16  # pairs per optimizer step, over all processes and micro-batches
    micro_batch: int = 0  # pairs per forward pass per process (0 = batch_size / processes)
    lr: float = 1e-5  # peak learning rate (AdamW)
    min_lr: float = 0.0  # the cosine schedule decays to this
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    warmup: float = 0.03  # fraction of steps with linear warm-up
    epochs: int = 1  # passes over the data
    max_steps: int = -1  # -1 = run --epochs; 0 = evaluate only (step-0 baseline); N = stop after N optimizer steps
    grad_clip: float = 1.0  # gradient-norm clipping (0 = off)
    seed: int = 1337  # model init, dropout and data order
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16
    compile: str = "auto"  # torch.compile the forward: auto (on for CUDA, off on CPU), on, off
    log_interval: int = 10  # steps per log line
    eval_interval: int = 0  # evaluate every N steps (0 = only at the end)
    save_interval: int = 0  # checkpoint every N steps (0 = only at the end)
    eval_batch: int = 32  # pairs per forward pass at evaluation
    resume: bool = False  # continue from <out>/ckpt
    # shard parameters, gradients and optimizer state over processes with FSDP2 fully_shard: each transformer layer
    # and the root; for models too big for one GPU; needs torchrun (a single process trains unsharded)
    fsdp: bool = False


def validate(cfg: TrainConfig):
    """Every check that needs no model and no tokenizer, so that a mistake is one line before anything runs:
    option values, the data files, --model, --device, and that --resume continues the same run."""
    choices = {"head": ("mlp", "linear"), "loss": ("mse", "bt-margin", "bt"), "compile": ("auto", "on", "off"),
               "dtype": ("auto", "float32", "bfloat16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"error: --{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.batch_size < 1 or cfg.max_len < 8 or cfg.lm_weight < 0 or cfg.max_steps < -1:
        raise SystemExit("error: need --batch-size >= 1, --max-len >= 8, --lm-weight >= 0, --max-steps >= -1 "
                         "(-1 = run --epochs, 0 = evaluate only)")
    if not cfg.data:
        raise SystemExit("error: --data is empty: give the training pairs (JSONL rows {prompt, chosen, rejected})")
    for option, paths in (("data", cfg.data.split(",")),
                          ("eval-data", [s.rpartition("=")[2] for s in filter(None, cfg.eval_data.split(","))])):
        for path in paths:
            check_data_file(option, path)
    check_model(cfg.model)
    check_device(cfg.device)
    if cfg.resume:
        check_resume(cfg)


def check_data_file(option, path):
    if os.path.isdir(path):
        raise SystemExit(f"error: --{option}={path} is a folder; give a data file (.jsonl, .jsonl.gz, .json, .parquet)")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --{option}={path}: no such file")


def is_hub_id(name):
    """'org/name' that is not a local path: a Hugging Face Hub model id, fetched into transformers' cache."""
    return not os.path.exists(name) and not name.endswith(".gguf") and \
        re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def check_model(name):
    """--model of train: built-in names pass to load_backbone; a path must hold a model; else a Hub id."""
    if "/" not in name and os.sep not in name and not name.endswith(".gguf") and not os.path.exists(name):
        return  # a built-in name ('tiny', ...): load_backbone knows them
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise SystemExit(f"error: --model={name}: no such .gguf file")
    elif os.path.isdir(name):
        ggufs = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
        if not os.path.exists(os.path.join(name, "config.json")):
            if len(ggufs) > 1:
                raise SystemExit(f"error: --model={name} holds several .gguf files ({', '.join(ggufs)}); "
                                 f"pass one, e.g. --model={os.path.join(name, ggufs[0])}")
            if not ggufs:
                raise SystemExit(f"error: --model={name} holds no model (no config.json, no .gguf file): give a "
                                 "Hugging Face causal-LM folder, a .gguf file or 'tiny'")
    elif os.path.exists(name):
        raise SystemExit(f"error: --model={name} is a file but not a .gguf; give a model folder or a .gguf file")
    elif not is_hub_id(name):
        raise SystemExit(f"error: --model={name}: no such folder or file (and not a Hugging Face id like "
                         "Qwen/Qwen2.5-0.5B-Instruct)")


def check_device(device):
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: --device={device!r} is not a device: auto, cpu, cuda, cuda:1, ...") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device} but CUDA is not available here (torch {torch.__version__}); "
                         "use --device=cpu or --device=auto")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")


# options that change how a run is watched or where it runs, not what it computes: --resume may change them
RESUME_MAY_CHANGE = {"resume", "eval_data", "eval_batch", "log_interval", "eval_interval", "save_interval", "device",
                     "compile", "fsdp"}


def check_resume(cfg):
    """--resume continues the run in <out>: stop (listing the differences) if this config would compute another."""
    saved = None
    for path, key in ((os.path.join(cfg.out, "ckpt", "state.json"), "config"),
                      (os.path.join(cfg.out, "config.json"), None)):
        try:
            with open(path) as f:
                saved = json.load(f)
            saved = saved[key] if key else saved
            break
        except (OSError, ValueError, KeyError):
            continue
    if not isinstance(saved, dict):
        return  # nothing to compare with: train() says there is no checkpoint
    now = dataclasses.asdict(cfg)
    diffs = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in now
             if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if diffs:
        raise SystemExit(f"error: --resume with a config that differs from the run in {cfg.out}: {'; '.join(diffs)}. "
                         f"Pass the same values to continue it, or give a new --out for a new run")


# ----------------------------------------------------------------------------------------------------------------
# data: rows -> prompt messages + answers -> token ids


class DataError(ValueError):
    pass


def as_messages(prompt, where):
    if isinstance(prompt, str):
        return parse_dialogue(prompt) or [{"role": "user", "content": prompt}]
    problem = check_messages(prompt)  # the same rule as distill's (teacher.check_messages)
    if problem:
        raise DataError(f"{where}: {problem}")
    return [{"role": m["role"], "content": message_text(m)} for m in prompt]


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
        fix = "--loss=bt" if "teacher_response" in row else "--loss=bt --lm-weight=0 (no teacher_response either)"
        raise DataError(f"{where}: this loss needs a preference strength: give chosen_score and rejected_score, "
                        f"or margin; for label-only pairs train with {fix}")
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


def answer_ids(tokenizer, answer):
    """An answer -> its token ids as every sequence ends: rendered answer + eos (the token the reward is read at)."""
    return encode(tokenizer, render_answer(tokenizer, answer)) + [tokenizer.eos_token_id]


@dataclass
class Example:
    prompt: tuple  # (prompt ids of the chosen row, of the rejected row): cut to fit each row
    chosen: list  # answer token ids, eos included unless the answer's end was cut
    rejected: list
    margin: float | None
    teacher: tuple | None  # (prompt ids, teacher answer ids): the LM target
    prompt_len: int = 0  # tokens of the whole rendered prompt, before cutting
    cuts: tuple = (None, None, None)  # fit()'s cut kind of the chosen, rejected and teacher-answer sequence


# A sequence over --max-len keeps the end of its prompt (the question and the assistant header the answer
# follows), then as much of the answer as fits. The one rule for every kind of sequence (reward rows, teacher
# answers) and every command (train, eval, bon, serve's prompt/response form), in fit():
#  1. the prompt loses tokens from its start, down to its floor: its last min(len, max(32, max_len // 4),
#     max_len // 2) tokens (32 tokens hold the last words of the question plus any chat template's assistant
#     header; a quarter of the budget keeps more of it for long --max-len; half the budget at most leaves the rest
#     to the answer);
#  2. only then the answer loses its end, EOS included. An answer cut at its end must not pretend to be complete:
#     its sequence stops at the last token that fits, with no EOS, and the reward is read there. Reward rows keep
#     the answer's beginning rather than its end: the question then runs straight into the answer, as when it
#     was written (cutting the start would glue the question to a mid-sentence fragment); the teacher answer (the
#     LM target) must stay the continuation of its prompt anyway, so one rule serves both kinds; and the
#     decisive part of many answers (a refusal, a direct answer) comes first.
CUT_KINDS = ("prompt_left", "prompt_min", "answer_end")
MOST_PROMPT_LOST_WARN = 0.10  # warn when more than this share of sequences keep under half of their prompt


def prompt_floor(prompt_len, max_len):
    """How many of the prompt's last tokens every sequence keeps (all of them for a short prompt)."""
    return min(prompt_len, max(32, max_len // 4), max_len // 2)


def fit(prompt, answer, max_len):
    """Cut prompt + answer ids to max_len tokens (see the rule above) -> (prompt, answer, cut kind): None when
    nothing was cut; 'prompt_left': the prompt lost its start, the answer is whole; 'prompt_min': the prompt was cut
    to its floor and the answer lost its end; 'answer_end': the answer lost its end, the (short) prompt is whole."""
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer, None
    floor = prompt_floor(len(prompt), max_len)
    if len(answer) <= max_len - floor:
        return prompt[len(prompt) - (max_len - len(answer)):], answer, "prompt_left"
    return (prompt[len(prompt) - floor:], answer[:max_len - floor],
            "prompt_min" if floor < len(prompt) else "answer_end")


@dataclass
class CutCounts:
    """How the sequences of one kind were cut to --max-len. Each sequence counts once, under exactly one of
    whole, prompt_left, prompt_min, answer_end (they add up to sequences); most_prompt_lost overlaps them."""
    sequences: int = 0
    whole: int = 0
    prompt_left: int = 0  # the prompt lost tokens from its start; the whole answer kept
    prompt_min: int = 0  # the prompt kept only its floor (its last tokens) and the answer lost its end and EOS
    answer_end: int = 0  # the answer lost its end and EOS; the prompt, shorter than its floor, kept whole
    most_prompt_lost: int = 0  # kept under half of the prompt's tokens

    def add(self, kind, kept_prompt, prompt_len):
        self.sequences += 1
        setattr(self, kind or "whole", getattr(self, kind or "whole") + 1)
        self.most_prompt_lost += kept_prompt < prompt_len / 2

    def summary(self, what):
        return (f"{self.sequences} {what}: {self.whole} whole, {self.prompt_left} prompt cut from the left, "
                f"{self.prompt_min} prompt cut to its floor + answer end cut, {self.answer_end} answer end cut "
                f"(prompt whole); {self.most_prompt_lost} kept under half of their prompt")


ROW_KINDS = {"reward": "chosen/rejected sequences", "teacher": "teacher-answer sequences"}


def count_cuts(examples, teacher):
    """The cuts of the sequences a run uses: both reward rows of every pair, and the teacher-answer rows only
    when the LM term trains on them (teacher=True; never in eval splits)."""
    cuts = {"reward": CutCounts(), **({"teacher": CutCounts()} if teacher else {})}
    for ex in examples:
        cuts["reward"].add(ex.cuts[0], len(ex.prompt[0]), ex.prompt_len)
        cuts["reward"].add(ex.cuts[1], len(ex.prompt[1]), ex.prompt_len)
        if teacher and ex.teacher is not None:
            cuts["teacher"].add(ex.cuts[2], len(ex.teacher[0]), ex.prompt_len)
    return cuts


def cut_warnings(name, cuts, max_len):
    """A warning per kind of sequence of which more than MOST_PROMPT_LOST_WARN kept under half of their prompt."""
    out = []
    for kind, counts in cuts.items():
        if counts.sequences and counts.most_prompt_lost > MOST_PROMPT_LOST_WARN * counts.sequences:
            out.append(f"warning: {name}: {counts.most_prompt_lost} of {counts.sequences} {ROW_KINDS[kind]} "
                       f"({100 * counts.most_prompt_lost / counts.sequences:.0f}%) keep under half of their prompt "
                       f"at --max-len={max_len}; a larger --max-len keeps more of the question")
    return out


@dataclass
class DataStats:
    rows: int = 0  # rows read
    kept: int = 0  # usable pairs
    dropped: dict = field(default_factory=dict)  # reason -> count
    cuts: dict = field(default_factory=dict)  # "reward" / "teacher" -> CutCounts (count_cuts)

    def drop(self, reason):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self, name):
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        cuts = "".join(f"\n  {counts.summary(ROW_KINDS[kind])}" for kind, counts in self.cuts.items())
        return f"{name}: {self.rows} rows, {self.kept} kept; dropped: {drops}" + cuts


def tokenize_example(tokenizer, parsed, max_len, stats):
    messages, chosen, rejected, margin, teacher = parsed
    prompt = encode(tokenizer, render_prompt(tokenizer, messages))
    chosen_ids, rejected_ids = answer_ids(tokenizer, chosen), answer_ids(tokenizer, rejected)
    if chosen_ids == rejected_ids:
        stats.drop("chosen == rejected")
        return None
    p_c, chosen_ids, chosen_cut = fit(prompt, chosen_ids, max_len)
    p_r, rejected_ids, rejected_cut = fit(prompt, rejected_ids, max_len)
    if p_c + chosen_ids == p_r + rejected_ids:
        stats.drop("identical after cutting to max_len")
        return None
    teacher_pair, teacher_cut = None, None
    if teacher and teacher.strip():
        p_t, teacher_ids, teacher_cut = fit(prompt, answer_ids(tokenizer, teacher), max_len)
        teacher_pair = (p_t, teacher_ids)
    return Example(prompt=(p_c, p_r), chosen=chosen_ids, rejected=rejected_ids, margin=margin,
                   teacher=teacher_pair, prompt_len=len(prompt), cuts=(chosen_cut, rejected_cut, teacher_cut))


def load_pairs(paths, tokenizer, max_len, need_margin=False, name="data", teacher=False, keep_ties=True):
    """JSONL file(s) -> tokenized Examples and the DataStats of what was dropped and cut (teacher: count the
    teacher-answer rows too, for a run that trains on them; keep_ties=False drops margin-0 pairs)."""
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
            parsed = parse_row(row, f"{path}:{line_no}", need_margin)
            if parsed[3] == 0 and not keep_ties:  # "equally good": only a margin loss (mse) can learn it
                stats.drop("margin 0 (style-equivalence pair; only --loss=mse learns it)")
                continue
            example = tokenize_example(tokenizer, parsed, max_len, stats)
            if example is not None:
                examples.append(example)
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"{paths}: no usable pairs ({stats.summary(name)})")
    stats.cuts = count_cuts(examples, teacher)
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


def world_sequences(tokenizer, pairs):
    """(prompt, answer) texts -> token ids as the student reads them: rendered prompt, answer, eos."""
    return [encode(tokenizer, render_prompt(tokenizer, as_messages(p, "world")) + render_answer(tokenizer, a))
            + [tokenizer.eos_token_id] for p, a in pairs]


def world_knowledge(tokenizer, world):
    """A probe of what an LM knows about the world: for every task and candidate style, does it give the correct
    answer a higher likelihood than a wrong one written the same way? Returns probe(lm) -> accuracy per family."""
    import sim
    from tiny_lm import answer_logprobs
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
    import sim
    import tiny_lm
    world, tokenizer = world or sim.WorldConfig(), ByteTokenizer()
    sequences = world_sequences(tokenizer, sim.world_corpus(world))
    return tiny_lm.pretrained(sequences, tiny_config(tokenizer, 1024), tokenizer.pad_token_id, log=log,
                              probe=lambda lm: world_knowledge(tokenizer, world)(lm))  # built only if it pretrains


def load_backbone(name, layers=0, max_len=1024):
    """'tiny' (pretrained on the simulated world's text), 'tiny-scratch' (random init), a local HF causal-LM folder,
    a .gguf file or a Hub id (org/name) -> (causal LM, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from tiny_lm import BYTE_TOKENIZER
    if name == "tiny":
        name = tiny_backbone(log=functools.partial(print, flush=True))
    if name == "tiny-scratch":
        tokenizer = ByteTokenizer()
        lm = LlamaForCausalLM(tiny_config(tokenizer, max_len))
    elif os.path.exists(os.path.join(name, BYTE_TOKENIZER)):  # a tiny student pretrained by tiny_lm.py
        tokenizer = ByteTokenizer()
        lm = LlamaForCausalLM.from_pretrained(name, dtype=torch.float32)
        lm.config.max_position_embeddings = max(max_len, lm.config.max_position_embeddings)
    else:
        folder, gguf = name, {}
        if name.endswith(".gguf"):
            folder, gguf = os.path.dirname(name) or ".", {"gguf_file": os.path.basename(name)}
        elif os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
            ggufs = [f for f in os.listdir(name) if f.endswith(".gguf")]
            gguf = {"gguf_file": ggufs[0]} if len(ggufs) == 1 else {}
        hub = not os.path.isdir(folder) and is_hub_id(name)  # e.g. Qwen/Qwen2.5-0.5B: transformers' own cache
        if not os.path.isdir(folder) and not hub:
            raise SystemExit(f"error: --model {name!r} is not 'tiny', a local model folder, a .gguf file or a "
                             "Hugging Face id (org/name)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
        except OSError as e:
            if not hub:
                raise
            raise SystemExit(f"error: --model={name} is not a local path, and loading it from the Hugging Face Hub "
                             f"failed (offline, or no such model?): {str(e).splitlines()[0]}") from None
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

    def tokens(self, prompt, answer, max_len=None, cuts=None):
        """(prompt, answer) -> token ids exactly as training builds them: rendered prompt + answer + eos, cut by
        fit(); the cut is counted in cuts (a CutCounts) when given."""
        prompt_ids = encode(self.tokenizer, render_prompt(self.tokenizer, as_messages(prompt, "prompt")))
        p, a, kind = fit(prompt_ids, answer_ids(self.tokenizer, answer), max_len or self.max_len)
        if cuts is not None:
            cuts.add(kind, len(p), len(prompt_ids))
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


def margin_fit(reward_margins, teacher_margins):
    """How well the student's Δr = r(chosen) − r(rejected) follows the teacher's Δs on held-out pairs: the Pearson
    correlation (None when either side is constant) and the mean squared error of Δr − Δs (what --loss=mse
    minimises; on another scale under the bt losses, where only the correlation compares)."""
    n = len(reward_margins)
    mean_r, mean_s = sum(reward_margins) / n, sum(teacher_margins) / n
    cov = sum((r - mean_r) * (s - mean_s) for r, s in zip(reward_margins, teacher_margins, strict=True))
    var_r = sum((r - mean_r) ** 2 for r in reward_margins)
    var_s = sum((s - mean_s) ** 2 for s in teacher_margins)
    pearson = cov / math.sqrt(var_r * var_s) if var_r > 0 and var_s > 0 else None
    mse = sum((r - s) ** 2 for r, s in zip(reward_margins, teacher_margins)) / n
    return {"pairs": n, "pearson": pearson, "mse": mse}


@torch.no_grad()
def evaluate(model, examples, batch_pairs, device, autocast):
    """-> (pair accuracy: the fraction of pairs with r(chosen) > r(rejected), a tie counts as wrong;
    margin_fit of Δr to Δs when every pair has a margin, else None)."""
    was_training = model.training
    model.eval()
    reward_margins = []
    for k in range(0, len(examples), batch_pairs):
        batch = to_device(collate(examples[k:k + batch_pairs], model.pad_id, False, False), device)
        with autocast:
            rewards, _ = model(batch)
        reward_margins += (rewards[:batch.n_pairs] - rewards[batch.n_pairs:]).tolist()
    model.train(was_training)
    accuracy = sum(m > 0 for m in reward_margins) / len(examples)
    teacher_margins = [ex.margin for ex in examples]
    if any(m is None for m in teacher_margins):
        return accuracy, None
    return accuracy, margin_fit(reward_margins, teacher_margins)


def fit_text(fit):
    pearson = "n/a (constant)" if fit["pearson"] is None else f"{fit['pearson']:.3f}"
    return f"margin fit: pearson {pearson}, mse {fit['mse']:.4f}"


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

    use_lm = cfg.lm_weight > 0
    if use_lm and cfg.layers and not cfg.model.startswith("tiny") and len(lm.model.layers) == cfg.layers:
        log(f"warning: --layers={cfg.layers} cuts the backbone and --lm-weight={cfg.lm_weight} > 0: the pretrained LM "
            "head on a cut backbone starts worse than uniform (SmolLM2-135M, 4 of 30 layers: 19.4 nats per "
            "teacher-answer token, 4.0 uncut, 10.8 uniform), so the LM term relearns language modelling rather "
            "than keeping it; consider --lm-weight=0 or more layers")

    examples, stats = load_pairs(cfg.data, tokenizer, cfg.max_len, need_margin=cfg.loss != "bt", name="train",
                                 keep_ties=cfg.loss == "mse")
    eval_sets, eval_stats = {}, {}
    for spec in filter(None, cfg.eval_data.split(",")):
        name, _, path = spec.rpartition("=")
        eval_sets[name or "eval"], eval_stats[name or "eval"] = load_pairs(path, tokenizer, cfg.max_len,
                                                                           name=name or "eval")
    if cfg.holdout:
        if cfg.holdout >= len(examples):
            raise SystemExit(f"error: --holdout {cfg.holdout} leaves no training pairs ({len(examples)} usable)")
        examples, eval_sets["heldout"] = examples[:-cfg.holdout], examples[-cfg.holdout:]
        eval_stats["heldout"] = DataStats(cfg.holdout, cfg.holdout, cuts=count_cuts(eval_sets["heldout"], False))
        log(f"holding out the last {cfg.holdout} pairs of --data as eval split 'heldout'")
    stats.cuts = count_cuts(examples, use_lm)  # only the rows this run trains on
    for name, data_stats in {"train": stats, **eval_stats}.items():
        log(data_stats.summary(name))
        for line in cut_warnings(name, data_stats.cuts, cfg.max_len):
            log(line)
    if use_lm and not any(ex.teacher for ex in examples):
        raise SystemExit(f"error: --lm-weight={cfg.lm_weight} needs teacher answers, but no row of {cfg.data} has a "
                         "'teacher_response': pass --lm-weight=0 (or train on what `rmd.py distill` writes)")

    micro = cfg.micro_batch or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise SystemExit(f"error: --batch-size {cfg.batch_size} must be a multiple of --micro-batch x processes "
                         f"({micro} x {world})")
    accum = cfg.batch_size // (micro * world)
    steps_per_epoch = len(examples) // cfg.batch_size
    total = cfg.max_steps if cfg.max_steps >= 0 else cfg.epochs * steps_per_epoch
    if steps_per_epoch == 0 and total:
        raise SystemExit(f"error: {len(examples)} usable pairs is fewer than one batch of {cfg.batch_size}: pass "
                         f"--batch-size={len(examples)} or less (or more data)")
    if total == 0:
        log("--max-steps=0: evaluating only (the step-0 baseline of the untrained value head)")
    leftover = len(examples) - steps_per_epoch * cfg.batch_size
    log("config: " + json.dumps(dataclasses.asdict(cfg)))  # after the data checks: an error stays one line
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
        """-> ({split: accuracy}, {split: margin_fit} for the splits whose pairs all have margins)."""
        results = {name: evaluate(model, data, cfg.eval_batch, device, autocast) for name, data in eval_sets.items()}
        return ({name: acc for name, (acc, _) in results.items()},
                {name: fit for name, (_, fit) in results.items() if fit is not None})

    def eval_text(metrics, fits):
        return ", ".join(f"{k} {v:.4f}" + (f" ({fit_text(fits[k])})" if k in fits else "") for k, v in metrics.items())

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
            log(f"step {step} eval: " + eval_text(*evaluate_all()))
        if step in (total, stop_after) or (cfg.save_interval and step % cfg.save_interval == 0):
            full = full_state(model, optimizer) if sharded else None  # all processes gather, rank 0 writes
            if master:
                save_checkpoint(ckpt_dir, model, optimizer, {"step": step, "config": dataclasses.asdict(cfg)}, full)
        if step == stop_after:
            return {}
    metrics, fits = evaluate_all()
    weights = full_state(model) if sharded else None
    if master:
        save_reward_model(model, os.path.join(cfg.out, "model"), cfg, weights)
        result = {"step": step, "accuracy": metrics, "margin_fit": fits, "train_data": dataclasses.asdict(stats),
                  "eval_data": {k: dataclasses.asdict(v) for k, v in eval_stats.items()},
                  "eval_pairs": {k: len(v) for k, v in eval_sets.items()}}
        with open(os.path.join(cfg.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        log("final eval: " + (eval_text(metrics, fits) or "no --eval-data given"))
        ckpt = ckpt_dir if os.path.exists(ckpt_dir) else "none (no step trained)"
        log(f"model: {os.path.join(cfg.out, 'model')}  checkpoint: {ckpt}  metrics: "
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
# `python rmd.py train` with no --data: the built-in tiny student on the demo distill output, sized for a CPU, with
# rmd's default recipe (ablation.py's DEFAULT_ARM: bt, LM weight 0.1, 400 steps; chosen on valid, see README)
DEMO_TRAIN = dict(data=f"{DEMO_OUT}/train.jsonl", eval_data=f"normal={DEMO_OUT}/builtin/normal.jsonl,"
                  f"hard={DEMO_OUT}/builtin/hard.jsonl", model="tiny", loss="bt", lr=1e-3, max_len=256,
                  max_steps=400, log_interval=50)


ABOUT = {
    "distill": "The teacher pipeline (teacher.py): pairs, pools or bare prompts -> refined training pairs. With no "
               "--teacher-url: the built-in simulated teacher on the built-in prompts (the demo).",
    "train": "Train the student reward model on preference pairs (what `rmd.py distill` writes, or your own). With no "
             "--data: the demo, " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in DEMO_TRAIN.items()) + ".",
}


def distill_command(argv):
    """`rmd.py distill`: teacher.distill, or with no --teacher-url the simulated teacher on the built-in prompts."""
    import teacher
    cfg = parse_overrides(teacher.DistillConfig(out=DEMO_OUT), argv, "python rmd.py distill", ABOUT["distill"])
    if not cfg.teacher_url and cfg.data:
        raise SystemExit(f"error: --data={cfg.data} needs a teacher: pass --teacher-url=URL (an OpenAI-compatible "
                         "server) and --teacher-model=NAME; the simulated teacher (no --teacher-url) only runs the "
                         "built-in prompts. For a local stand-in: `python rmd.py teacher-sim --port=8000` and "
                         "--teacher-url=http://127.0.0.1:8000/v1 --teacher-model=sim-teacher")
    try:
        if cfg.teacher_url:
            check_bare_prompts(cfg, teacher.load_rows(cfg.data, cfg.limit, cfg.shard) if cfg.data else [])
            summary = teacher.distill(cfg)
            demo = False
        else:
            summary, cfg, demo = distill_builtin(cfg), dataclasses.replace(cfg, data="builtin"), True
    except ValueError as e:  # bad input rows: all of them, one per line
        raise SystemExit(f"error: {e}") from None
    except (OSError, FatalError, TransportError) as e:  # a server's reply may hold an HTML page: one line
        raise SystemExit("error: " + " ".join(str(e).split())) from None
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; finished requests are in the cache: run the same command again to "
                         "resume") from None
    say_what_distill_wrote(cfg, summary, demo)
    return summary


def check_bare_prompts(cfg, rows):
    bare = [r for r in rows if r["kind"] == "prompt"]
    if bare and not cfg.candidate_models:
        raise SystemExit(f"error: {cfg.data}:{bare[0]['line']}: {len(bare)} row(s) are bare prompts {{prompt}}: "
                         "their two answers are generated first, so pass --candidate-models=m1,m2 (served at "
                         "--candidate-urls, or at --teacher-url)")


def distill_builtin(cfg):
    import sim
    import teacher
    world = sim.WorldConfig(seed=cfg.seed)
    paths = sim.write_builtin_data(os.path.join(cfg.out, "builtin"), world)
    url, shutdown = sim.start_server(world)
    print(f"no --teacher-url: using the built-in simulated teacher at {url} (sim.py) on the built-in prompts "
          f"({paths['distill']}); held-out eval splits in {os.path.dirname(paths['normal'])}", file=sys.stderr)
    try:
        return teacher.distill(dataclasses.replace(cfg, teacher_url=url, teacher_model=sim.TEACHER_MODEL,
                                                   data=paths["distill"]))
    finally:
        shutdown()


def say_what_distill_wrote(cfg, summary, demo):
    """The end of a distill run: what was written where, and what to run next; a run that kept nothing fails."""
    failed = {}
    for stage in summary.get("stages", {}).values():
        for reason, n in stage.get("failures", {}).items():
            failed[reason] = failed.get(reason, 0) + n
    failures = os.path.join(cfg.out, "failures.jsonl")
    if not summary["kept"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted({**summary.get("dropped", {}), **failed}.items())) or "none"
        raise SystemExit(f"error: no pair was kept from {summary['rows']} row(s) (dropped or failed: {why}); every "
                         f"row's reason and the teacher's replies are in {failures}")
    train_file = os.path.join(cfg.out, "train.jsonl")
    extra = (summary.get("restyle") or {}).get("pairs", 0)
    extra = f" + {extra} from the restyle stage" if extra else ""
    if summary.get("original_pairs"):
        extra += f" + {summary['original_pairs']} of their teacher-labelled input pairs"
    print(f"wrote {train_file} ({summary['kept']} refined pairs{extra}), {os.path.join(cfg.out, 'annotated.jsonl')} "
          f"(the teacher-labelled input pairs), {failures} (rows not kept, with reasons), "
          f"{os.path.join(cfg.out, 'summary.json')}", file=sys.stderr)
    if demo and cfg.out == DEMO_OUT:
        print("next: python rmd.py train   (the demo student on these pairs)", file=sys.stderr)
    else:
        print(f"next: python rmd.py train --data={train_file} --eval-data=YOUR_TEST.jsonl --model=HF_MODEL "
              f"--out=out/rm", file=sys.stderr)


def train_command(argv):
    demo = not any(a.replace("_", "-").startswith(("--data", "--dataset", "--train-file", "-h", "--help"))
                   for a in argv)
    cfg = parse_overrides(TrainConfig(**DEMO_TRAIN) if demo else TrainConfig(), argv, "python rmd.py train",
                          ABOUT["train"])
    if demo and not os.path.exists(cfg.data):
        raise SystemExit(f"error: no --data given and no demo data at {cfg.data}: run `python rmd.py distill` "
                         "first, or pass --data=pairs.jsonl (rows {prompt, chosen, rejected[, chosen_score, "
                         "rejected_score, teacher_response]}; see README.md)")
    try:
        metrics = train(cfg)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks
        return metrics
    model = os.path.join(cfg.out, "model")
    bon = os.path.join(os.path.dirname(cfg.data), "builtin", "bon.jsonl")
    if demo and metrics and os.path.exists(bon):
        explain_demo(cfg, metrics, bon)
        print(f"next: python rmd.py bon --model={model} --data={bon}   (best-of-N against the true quality)")
    print(f"next: python rmd.py eval --model={model} --data=PAIRS.jsonl | python rmd.py serve --model={model}")
    return metrics


def explain_demo(cfg, metrics, bon_path):
    """The demo's last lines: what its numbers mean, and best-of-N with the trained model."""
    import evaluate
    rows = evaluate.read_rows(bon_path)
    scored = evaluate.best_of_n(load_reward_model(os.path.join(cfg.out, "model")), rows, max_len=cfg.max_len)
    bon, n = evaluate.pick_quality(rows, scored), len(rows[0][1]["responses"])
    print(f"\nWhat the numbers mean (held-out tasks the preference data never asked; chance = 50%):\n"
          f"  normal {100 * metrics['normal']:.1f}%: a correct and a wrong answer from the natural candidate pool\n"
          f"  hard   {100 * metrics['hard']:.1f}%: a correct plain answer against a wrong, fancier one (style trap)\n"
          f"  best-of-{n} {100 * bon['picked']['correct']:.1f}%: share of correct picks among {n} candidates for "
          f"{bon['rows']} prompts (random pick {100 * bon['random']['correct']:.1f}%, oracle "
          f"{100 * bon['oracle']['correct']:.1f}%)\n"
          "Label distillation on the same teacher (ablation.py, arm a) is the baseline to beat: see README.md.",
          flush=True)


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
        import difflib
        commands = ("distill", "train", "eval", "bon", "serve", "teacher-sim")
        close = difflib.get_close_matches(command, commands, n=1)
        raise SystemExit(f"error: unknown command {command!r}" + (f"; did you mean {close[0]}?" if close else "")
                         + f" (commands: {', '.join(commands)}; `python rmd.py COMMAND --help` lists its options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
