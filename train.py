"""train.py -- train the student reward model: TrainConfig and its checks, the step's loss, the training loop.

    import train
    train.train(train.TrainConfig(data="pairs.jsonl", eval_data="test.jsonl", model="path/to/hf-model"))

`python rmd.py train --key=value ...` fills TrainConfig from the command line (rmd.py) and calls train(). The data
files are tokenized once into --token-cache and mapped by every process (pair_cache.py). One step takes --batch-size
pairs in a deterministic order (batches.epoch_batches), split over processes and micro-batches; each micro-batch is
one packed forward pass (batches.collate) of the chosen, rejected and teacher-answer rows, a pair's prompt computed
once for all of them where that pays (--share-prompts), and step_loss is its loss: the pairwise loss + --lm-weight x
the LM loss on the teacher answers (loss.py). The run evaluates pair accuracy on the --eval-data splits, logs one line
per --log-interval steps (and log.jsonl), checkpoints for --resume (distributed.py) and saves the reward model
(model.save_reward_model) with eval.json and report.html (report.py). --gradient-checkpointing is
model.checkpoint_activations, --lora-r is lora.py (the adapters are merged before saving), --report-to's trackers
(tensorboard, wandb) are at the end of this file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

import distributed
import files
import lora
import report
import recipe
from batches import (DataStats, PairStore, check_data_file, collate, count_cuts, cut_warnings, epoch_batches,
                     load_pairs, to_device)
from evaluation import fit_text, margin_fit
from cli import Progress
from formats import UsageError, column_keys
from loss import LEARNS_TIES, NEEDS_MARGINS, PAIRWISE_KINDS, linear_cross_entropy, pairwise_loss
from model import (RewardModel, attention_key_cost, checkpoint_activations, cut_layers, is_hub_id, load_backbone,
                   pick_device, save_reward_model)


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    data: str = ""  # training data (.jsonl, .jsonl.gz, a .json array, .parquet or hf:owner/name[:split]); comma-separated
    eval_data: str = ""  # held-out pairs: "file" or "name=file,name=file"
    prompt_key: str = ""  # column holding the prompt ("" = prompt; OpenRLHF's --prompt_key), for --data and --eval-data
    chosen_key: str = ""  # column holding the chosen answer ("" = chosen)
    rejected_key: str = ""  # column holding the rejected answer ("" = rejected)
    holdout: int = 0  # also hold out the last N usable pairs of --data as the eval split "heldout"
    # where the model, checkpoints, log.jsonl and eval.json go; one run at a time; a folder with an earlier run in it
    # is refused without --resume
    out: str = "out/train"
    model: str = ""  # the student: an HF folder, a Hub id, a .gguf file, or (rmd.py only) the demo's "tiny"
    layers: int = 0  # keep only the first N transformer layers of the backbone (0 = all)
    head: str = "mlp"  # value head: "mlp" (dropout, Linear(H,1024), ReLU, Linear(1024,1)) or "linear"
    dropout: float = 0.1  # value-head dropout
    # reward = value head + w x the answer's log-likelihood under a frozen copy of the student as given (what it
    # knew before training), w one learned weight (from 0, its own rate LIKELIHOOD_LR); costs one more forward pass
    likelihood: bool = recipe.RECIPE.likelihood
    loss: str = recipe.RECIPE.loss  # pairwise loss: bt (the recipe), bt-margin, mse (margin regression)
    lm_weight: float = recipe.RECIPE.lm_weight  # lambda of the LM term on the teacher answers (0 = off); the recipe's
    max_len: int = 1024  # tokens per sequence; longer ones keep the prompt's end, then the answer's start (see fit)
    # a pair's prompt computed once, its chosen, rejected and teacher answers each attending to it and to themselves
    # (same rewards, losses and gradients): auto (per micro-batch, where it costs less by model.layout_cost: not
    # for short prompts), on, off (every row with its own copy of the prompt)
    share_prompts: str = "auto"
    # tokenize each data file once into this folder and map it in every process and rerun (pair_cache.py: keyed by
    # the file's contents, the tokenizer, --max-len and the cutting rule); "off" = tokenize in memory every run
    token_cache: str = "out/token_cache"
    batch_size: int = recipe.RECIPE.batch_size  # pairs per optimizer step, over all processes and micro-batches
    micro_batch: int = 0  # pairs per forward pass per process (0 = batch_size / processes)
    # peak learning rate (AdamW); 0 = the recipe's rule by the backbone's size (recipe.py): 0.001 below 10M
    # parameters, 5e-05 below 1000M parameters, 1e-05 above
    lr: float = 0.0
    min_lr: float = 0.0  # the cosine schedule decays to this
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    warmup: float = 0.03  # fraction of steps with linear warm-up
    epochs: int = recipe.RECIPE.epochs  # passes over the data (at least; see --min-steps)
    # ...and at least this many optimizer steps: a small data set gets more passes
    min_steps: int = recipe.RECIPE.min_steps
    # -1 = max(--epochs passes, --min-steps); 0 = evaluate only (step-0 baseline); N = exactly N steps
    max_steps: int = -1
    grad_clip: float = 1.0  # gradient-norm clipping (0 = off)
    seed: int = 1337  # model init, dropout and data order
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16
    compile: str = "auto"  # torch.compile the forward: auto (on for CUDA, off on CPU), on, off
    log_interval: int = 10  # steps per log line
    eval_interval: int = 0  # evaluate every N steps (0 = only at the end)
    save_interval: int = 0  # checkpoint every N steps (0 = only at the end); the previous copy stays as ckpt.old
    eval_batch: int = 32  # pairs per forward pass at evaluation
    resume: bool = False  # continue from <out>/ckpt (the newest whole copy; the folder may have been moved or copied)
    # shard parameters, gradients and optimizer state over processes with FSDP2 fully_shard: each transformer layer
    # and the root; for models too big for one GPU; needs torchrun (a single process trains unsharded)
    fsdp: bool = False
    report_to: str = "none"  # also log the scalars of log.jsonl to: none, tensorboard (<out>/tensorboard), wandb
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward: less memory, slower steps
    lora_r: int = 0  # LoRA rank on the backbone's linear layers (needs peft; 0 = full fine-tune); saved merged
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input

    @property
    def use_lm(self):
        """--lm-weight > 0: the teacher-answer rows are packed into every micro-batch (derived, not an option)."""
        return self.lm_weight > 0


def validate(cfg: TrainConfig, backbone=None):
    """Every check that needs no model and no tokenizer, so that a mistake is one line before anything runs:
    option values, the data files, --model (unless a `backbone` loader of train's is given: it knows its names),
    --device, and that --resume continues the same run."""
    choices = {"head": ("mlp", "linear"), "loss": PAIRWISE_KINDS, "compile": ("auto", "on", "off"),
               "share_prompts": ("auto", "on", "off"),
               "dtype": ("auto", "float32", "bfloat16"), "report_to": ("none", "tensorboard", "wandb")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UsageError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if (cfg.batch_size < 1 or cfg.max_len < 8 or cfg.lm_weight < 0 or cfg.max_steps < -1 or cfg.min_steps < 0
            or cfg.lr < 0):
        raise UsageError("need --batch-size >= 1, --max-len >= 8, --lm-weight >= 0, --lr >= 0 (0 = the "
                         "recipe's rule), --min-steps >= 0, --max-steps >= -1 (-1 = max(--epochs, --min-steps), 0 = "
                         "evaluate only)")
    if cfg.lora_r < 0 or (cfg.lora_r and cfg.fsdp):
        raise UsageError("need --lora-r >= 0 (0 = off); LoRA with --fsdp is not supported (the adapters "
                         "are merged into unsharded weights at the end): drop --fsdp or --lora-r")
    if not cfg.data:
        raise UsageError("--data is empty: give the training pairs (JSONL rows {prompt, chosen, rejected})")
    for option, paths in (("data", cfg.data.split(",")),
                          ("eval-data", [s.rpartition("=")[2] for s in filter(None, cfg.eval_data.split(","))])):
        for path in paths:
            check_data_file(option, path)
    if not cfg.model:
        raise UsageError("--model is empty: give the student, a Hugging Face id (e.g. "
                         "--model=HuggingFaceTB/SmolLM2-135M-Instruct), a model folder, a .gguf file, or --model=tiny "
                         "for the built-in toy student (pretrained on the simulated world only)")
    if backbone is None:
        check_model(cfg.model)
    pick_device(cfg.device)
    if cfg.resume:
        check_resume(cfg)


def check_model(name):
    """--model of train: a path must hold a model; else a Hub id."""
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise UsageError(f"--model={name}: no such .gguf file")
    elif os.path.isdir(name):
        ggufs = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
        if not os.path.exists(os.path.join(name, "config.json")):
            if len(ggufs) > 1:
                raise UsageError(f"--model={name} holds several .gguf files ({', '.join(ggufs)}); "
                                 f"pass one, e.g. --model={os.path.join(name, ggufs[0])}")
            if not ggufs:
                raise UsageError(f"--model={name} holds no model (no config.json, no .gguf file): give a "
                                 "Hugging Face causal-LM folder or a .gguf file")
    elif os.path.exists(name):
        raise UsageError(f"--model={name} is a file but not a .gguf; give a model folder or a .gguf file")
    elif not is_hub_id(name):
        demo = (" ('tiny' and 'tiny-scratch' are the demo's students: `python rmd.py train --model=tiny`, or in "
                "Python train.train(cfg, backbone=demo.tiny_lm.load_tiny))") if os.sep not in name else ""
        raise UsageError(f"--model={name}: no such folder or file (and not a Hugging Face id like "
                         f"Qwen/Qwen2.5-0.5B-Instruct){demo}")


# Peak rate of the likelihood term's one weight (--likelihood): its scale is nats of the answer's log-likelihood, not
# the backbone's, so it does not follow --lr (at 5e-5 it could move only ~0.02 in 400 steps)
LIKELIHOOD_LR = 1e-2

RESUME_MAY_CHANGE = {"resume", "eval_data", "eval_batch", "log_interval", "eval_interval", "save_interval", "device",
                     "compile", "fsdp", "report_to", "gradient_checkpointing", "share_prompts",
                     "token_cache", "out"}  # a run folder may be moved or copied, and resumed where it is now


def check_resume(cfg):
    """--resume continues the run in <out>: stop (listing the differences) if this config would compute another."""
    saved = None
    found = distributed.checkpoint_dir(os.path.join(cfg.out, "ckpt"))
    for path, key in ((os.path.join(found or os.path.join(cfg.out, "ckpt"), "state.json"), "config"),
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
        raise UsageError(f"--resume with a config that differs from the run in {cfg.out}: {'; '.join(diffs)}. "
                         f"Pass the same values to continue it, or give a new --out for a new run")


# ----------------------------------------------------------------------------------------------------------------
# one step


def lr_at(step, total, peak, cfg):
    """Linear warm-up to `peak` over --warmup of the steps, then cosine down to --min-lr."""
    warmup = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_lr(cfg, model, log):
    """--lr, or with --lr=0 the recipe's rule by the backbone's parameter count (recipe.lr_for), said in the log."""
    if cfg.lr > 0:
        return cfg.lr
    parameters = sum(p.numel() for p in model.lm.parameters())
    lr = recipe.lr_for(parameters)
    log(f"lr {lr:g}: the recipe's rule for a backbone of {parameters / 1e6:.1f}M parameters ({recipe.lr_rule_text()}; "
        "--lr to choose another)")
    return lr


def step_loss(model, batch, kind, lm_weight, pairs_in_step, lm_tokens_in_step, lm_loss=linear_cross_entropy):
    """Loss of one micro-batch -> (loss to backpropagate, pairwise loss, LM loss, correct pairs). loss = the pairwise
    loss of `kind` (loss.PAIRWISE_KINDS) + lm_weight x the LM loss on the teacher-answer tokens, each part scaled so
    that the sum over a step's micro-batches and processes is the step's mean (pairs_in_step, lm_tokens_in_step: the
    step's totals). lm_loss(hidden, weight, targets): the fused kernel of loss.py (a benchmark passes a naive one)."""
    rewards, lm_hidden = model(batch)
    chosen, rejected = rewards[:batch.n_pairs], rewards[batch.n_pairs:]
    pair = pairwise_loss(chosen, rejected, batch.margins, kind=kind) * (batch.n_pairs / pairs_in_step)
    lm = torch.zeros((), device=rewards.device)
    if lm_weight > 0 and len(batch.lm_target):
        weight = getattr(model, "module", model).lm.get_output_embeddings().weight  # model may be DDP-wrapped
        lm = lm_loss(lm_hidden, weight, batch.lm_target) * (len(batch.lm_target) / lm_tokens_in_step)
    correct = (chosen.detach() > rejected.detach()).sum()
    return pair + lm_weight * lm, pair, lm, correct


@torch.no_grad()
def pair_accuracy(model, examples, batch_pairs, device, autocast, rewards_out=None, layout="separate"):
    """-> (pair accuracy: the fraction of pairs with r(chosen) > r(rejected), a tie counts as wrong;
    margin_fit of Δr to Δs when every pair has a margin, else None). rewards_out: a list that gets each pair's
    (r(chosen), r(rejected)) (for report.py's histograms). layout: batches.collate's (the cost rule's weight is
    the model's)."""
    was_training = model.training
    model.eval()
    reward_margins, key_cost = [], attention_key_cost(model.lm)
    for k in range(0, len(examples), batch_pairs):
        batch = to_device(collate(examples[k:k + batch_pairs], model.pad_id, False, False, layout, key_cost), device)
        with autocast:
            rewards, _ = model(batch)
        reward_margins += (rewards[:batch.n_pairs] - rewards[batch.n_pairs:]).tolist()
        if rewards_out is not None:
            rewards_out += zip(rewards[:batch.n_pairs].tolist(), rewards[batch.n_pairs:].tolist())
    model.train(was_training)
    accuracy = sum(m > 0 for m in reward_margins) / len(examples)
    teacher_margins = examples.column("margin")  # NaN: the pair has none
    if np.isnan(teacher_margins).any():
        return accuracy, None
    return accuracy, margin_fit(reward_margins, teacher_margins.tolist())


# ----------------------------------------------------------------------------------------------------------------
# setting up a run


@dataclass
class TrainRun:
    """What the loop needs besides the config: the model (and its DDP / compiled wrapper), where it runs, the data."""
    model: RewardModel
    forward_model: torch.nn.Module  # the model as the forward pass calls it: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    rank: int
    world: int
    device: str
    autocast: torch.autocast
    sharded: bool  # FSDP2
    examples: PairStore
    stats: DataStats
    eval_sets: dict  # split -> Examples
    eval_stats: dict  # split -> DataStats
    micro: int  # pairs per forward pass per process
    accum: int  # micro-batches per step per process
    steps_per_epoch: int
    total: int  # optimizer steps of the whole run
    log: object  # print on rank 0, silent elsewhere
    lr: float  # the peak learning rate (--lr, or the recipe's rule)
    tracker: object = None  # --report-to's experiment tracker (rank 0), see open_tracker
    layout: str = "separate"  # batches.collate's layout (--share-prompts)
    key_cost: float = 0.0  # model.attention_key_cost: the weight of attention in layout="auto"'s cost rule
    epoch_order: tuple = (None, None)  # (epoch, its batches.epoch_batches)


def build_model(cfg, device, log, backbone=None):
    """The student: the --model backbone (loaded by `backbone`, default model.load_backbone) + a value head."""
    lm, tokenizer = (backbone or load_backbone)(cfg.model, 0, cfg.max_len)
    layers = len(lm.model.layers) if cfg.layers else 0
    lm = cut_layers(lm, cfg.layers)
    if cfg.gradient_checkpointing:
        checkpoint_activations(lm)
    if cfg.lm_weight > 0 and cfg.layers and cfg.layers < layers:
        log(f"warning: --layers={cfg.layers} cuts the backbone and --lm-weight={cfg.lm_weight} > 0: the pretrained LM "
            "head on a cut backbone starts worse than uniform (SmolLM2-135M, 4 of 30 layers: 19.4 nats per "
            "teacher-answer token, 4.0 uncut, 10.8 uniform), so the LM term relearns language modelling rather "
            "than keeping it; consider --lm-weight=0 or more layers")
    if cfg.head == "linear" and cfg.likelihood:
        log("warning: --head=linear with the likelihood term (--likelihood, the recipe's): the saved model loads with "
            "load_reward_model but is no AutoModelForSequenceClassification checkpoint, which cannot add the "
            "likelihood; add --likelihood=false for that export")
    model = RewardModel(lm, tokenizer, cfg.head, cfg.dropout, cfg.max_len, cfg.likelihood).to(device)
    if cfg.lora_r:  # LoRA adapters on the backbone's linear layers; value head and LM head stay fully trained
        trainable, total = lora.add_adapters(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        log(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}: training {trainable:,} of {total:,} parameters")
    return model


def load_data(cfg, tokenizer, log):
    """--data, --eval-data and --holdout -> (train examples, their DataStats, eval splits, their DataStats)."""
    cache = None if cfg.token_cache == "off" else cfg.token_cache
    examples, stats = load_pairs(cfg.data, tokenizer, cfg.max_len, need_margin=cfg.loss in NEEDS_MARGINS,
                                 name="train", keep_ties=cfg.loss in LEARNS_TIES, keys=column_keys(cfg),
                                 cache_dir=cache)
    eval_sets, eval_stats = {}, {}
    for spec in filter(None, cfg.eval_data.split(",")):
        name, _, path = spec.rpartition("=")
        eval_sets[name or "eval"], eval_stats[name or "eval"] = load_pairs(
            path, tokenizer, cfg.max_len, name=name or "eval", keys=column_keys(cfg), cache_dir=cache)
    if cfg.holdout:
        if cfg.holdout >= len(examples):
            raise UsageError(f"--holdout {cfg.holdout} leaves no training pairs ({len(examples)} usable)")
        examples, eval_sets["heldout"] = examples[:-cfg.holdout], examples[-cfg.holdout:]
        eval_stats["heldout"] = DataStats(cfg.holdout, cfg.holdout, cuts=count_cuts(eval_sets["heldout"], False))
        log(f"holding out the last {cfg.holdout} pairs of --data as eval split 'heldout'")
    stats.cuts = count_cuts(examples, cfg.use_lm)  # only the rows this run trains on
    for name, data_stats in {"train": stats, **eval_stats}.items():
        log(data_stats.summary(name))
        for line in cut_warnings(name, data_stats.cuts, cfg.max_len):
            log(line)
    if cfg.use_lm and not (examples.column("teacher") >= 0).any():
        raise UsageError(f"--lm-weight={cfg.lm_weight} needs teacher answers, but no row of {cfg.data} has a "
                         "'teacher_response': pass --lm-weight=0 (or train on what `rmd.py distill` writes)")
    return examples, stats, eval_sets, eval_stats


def plan_steps(cfg, pairs, world, log):
    """-> (pairs per micro-batch, micro-batches per step, steps per epoch, total steps), or a one-line error."""
    micro = cfg.micro_batch or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch x processes "
                         f"({micro} x {world})")
    accum = cfg.batch_size // (micro * world)
    steps_per_epoch = pairs // cfg.batch_size
    total = cfg.max_steps if cfg.max_steps >= 0 else recipe.total_steps(steps_per_epoch, cfg.epochs, cfg.min_steps)
    if steps_per_epoch == 0 and total:
        raise UsageError(f"{pairs} usable pairs is fewer than one batch of {cfg.batch_size}: pass "
                         f"--batch-size={pairs} or less (or more data)")
    if total == 0:
        log("--max-steps=0: evaluating only (the step-0 baseline of the untrained value head)")
    leftover = pairs - steps_per_epoch * cfg.batch_size
    log("config: " + json.dumps(dataclasses.asdict(cfg)))  # after the data checks: an error stays one line
    log(f"{pairs} pairs, {steps_per_epoch} steps per epoch ({leftover} pairs left over per epoch, reshuffled "
        f"next epoch), {total} steps; {world} process(es) x {accum} micro-batch(es) x {micro} pairs")
    return micro, accum, steps_per_epoch, total


def build_optimizer(model, cfg, lr, cuda, sharded):
    """AdamW over the trained parameters (LoRA freezes the backbone's); weight decay on matrices only. Each group's
    peak rate is its "peak" (lr_at schedules it): lr, and LIKELIHOOD_LR for the likelihood term's one weight."""
    own = getattr(model, "likelihood_weight", None)
    trained = [p for p in model.parameters() if p.requires_grad and p is not own]
    groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": cfg.weight_decay, "peak": lr},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0, "peak": lr}]
    if own is not None:
        groups.append({"params": [own], "weight_decay": 0.0, "lr": LIKELIHOOD_LR, "peak": LIKELIHOOD_LR})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95),
                             fused=True if not sharded else (cuda or None))  # fused: 4x faster step on CPU too


def set_up(cfg, backbone=None):
    """Everything before the first step: processes, model, data, sharding, optimizer, wrappers -> TrainRun."""
    rank, world, device = distributed.setup_distributed(cfg.device)
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    tracker = open_tracker(cfg.report_to, cfg.out, dataclasses.asdict(cfg)) if rank == 0 else None  # errors first
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg, device, log, backbone)
    examples, stats, eval_sets, eval_stats = load_data(cfg, model.tokenizer, log)
    micro, accum, steps_per_epoch, total = plan_steps(cfg, len(examples), world, log)
    cuda = "cuda" in str(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=dtype == "bfloat16")
    sharded = cfg.fsdp and world > 1
    if sharded:  # before the optimizer is built: its parameters are the shards
        distributed.shard(model, bf16=cuda and dtype == "bfloat16")
    lr = peak_lr(cfg, model, log)
    optimizer = build_optimizer(model, cfg, lr, cuda, sharded)
    layout = {"auto": "auto", "on": "shared", "off": "separate"}[cfg.share_prompts]
    return TrainRun(model=model, forward_model=model, optimizer=optimizer, rank=rank, world=world, device=device,
                    autocast=autocast, sharded=sharded, examples=examples, stats=stats, eval_sets=eval_sets,
                    eval_stats=eval_stats, micro=micro, accum=accum, steps_per_epoch=steps_per_epoch, total=total,
                    log=log, lr=lr, tracker=tracker, layout=layout, key_cost=attention_key_cost(model.lm))


def resume(cfg, run):
    """--resume: load the checkpoint in <out>/ckpt -> the step to continue from."""
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    copies = distributed.checkpoint_copies(ckpt_dir)
    found = distributed.checkpoint_dir(ckpt_dir, copies)
    damaged = {copy: problem for copy, problem in copies.items() if problem not in (None, "missing")}
    if found is None:
        why = f" (damaged: {'; '.join(f'{c}: {p}' for c, p in damaged.items())})" if damaged else ""
        raise UsageError(f"--resume but no whole checkpoint in {ckpt_dir}{why}; drop --resume (or give a "
                         "fresh --out) to start again")
    for copy, problem in damaged.items():
        run.log(f"warning: checkpoint {copy} is not whole: {problem} (a save cut short, or a crash of the "
                f"machine); resuming from {found}, the newest whole copy")
    step = distributed.load_checkpoint(found, run.model, run.optimizer, run.sharded)["step"]
    run.log(f"resumed from {found} at step {step}")
    if run.rank == 0:
        distributed.truncate_log(os.path.join(cfg.out, "log.jsonl"), step)
        distributed.truncate_log(os.path.join(cfg.out, "eval_log.jsonl"), step)  # report.py's evaluations over steps
    return step


def wrap(cfg, run):
    """DDP across processes (FSDP2 is applied in set_up), then torch.compile: the forward the loop calls."""
    cuda = "cuda" in str(run.device)
    if run.world > 1 and not run.sharded:
        run.forward_model = distributed.data_parallel(run.model, run.device, cuda,
                                                      find_unused_parameters=not cfg.use_lm)
    if cfg.compile == "on" or (cfg.compile == "auto" and cuda):
        run.forward_model = torch.compile(run.forward_model)


# ----------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, stop_after: int = 0, on_step=None, backbone=None):
    """Train a reward model; returns the final eval metrics ({split: accuracy}).

    backbone(name, layers, max_len) -> (causal LM, tokenizer) loads --model (default model.load_backbone); the demo
    passes demo.tiny_lm.load_tiny for its students 'tiny' and 'tiny-scratch'.
    stop_after > 0 checkpoints and returns {} after that step, as if the run had been cut there (for tests).
    on_step(step, numbers) is called after every optimizer step, on every process, with that step's numbers:
    seconds (from data to optimizer step), pair_loss, lm_loss, correct, pairs, tokens (computed, padding not
    included) and slots (incl. padding) of this process, shared_pairs (prompt computed once) and separate_pairs
    (--share-prompts asked, but the pair's rows were cut to different prompts) -- for a benchmark or a caller.
    One run at a time per cfg.out: another process's run there is a files.FolderBusy naming its PID."""
    validate(cfg, backbone)
    with out_lock(cfg):
        check_fresh_out(cfg)
        return run_training(cfg, stop_after, on_step, backbone)


def out_lock(cfg):
    """The lock on cfg.out (files.folder_lock), taken by rank 0 only: the other processes of a torchrun run are
    the same run; a second run's rank 0 fails, and torchrun stops its other processes."""
    if int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    return files.folder_lock(cfg.out, "train")


def earlier_run(out):
    """What of an earlier run `out` holds (log.jsonl records, checkpoint copies), in words, or None."""
    found = []
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log) and os.path.getsize(log):
        with open(log) as f:
            found.append(f"log.jsonl with {sum(1 for line in f if line.strip())} records")
    copies = [os.path.basename(c) for c in distributed.checkpoint_copies(os.path.join(out, "ckpt"))
              if os.path.isdir(c)]  # a file of that name is no checkpoint: the first save replaces it
    if copies:
        found.append(f"checkpoint {', '.join(copies)}")
    return " and ".join(found) or None


def check_fresh_out(cfg):
    """Without --resume, --out must hold no earlier run: its log.jsonl would get a second history and its
    checkpoint would be overwritten. One line naming --resume and a fresh --out."""
    found = None if cfg.resume else earlier_run(cfg.out)
    if found:
        raise UsageError(f"{cfg.out} holds an earlier run ({found}): pass --resume to continue it (a finished run is "
                         f"evaluated again), or give a fresh --out for a new run (or delete {cfg.out})")


def run_training(cfg, stop_after, on_step, backbone):
    """train() once the output folder is this run's."""
    run = set_up(cfg, backbone)
    step = resume(cfg, run) if cfg.resume else 0
    wrap(cfg, run)
    if run.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    log_file = open(os.path.join(cfg.out, "log.jsonl"), "a") if run.rank == 0 else None
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    run.model.train()
    window = {"pair": 0.0, "lm": 0.0, "correct": 0, "pairs": 0, "tokens": 0, "slots": 0, "time": 0.0, "steps": 0}
    progress = Progress(run.total - step, "train", every=float("inf")), step  # (its clock, the step it started at)
    while step < run.total:
        numbers = train_step(cfg, run, step)
        step += 1
        for key, name in (("pair", "pair_loss"), ("lm", "lm_loss"), ("correct", "correct"), ("pairs", "pairs"),
                          ("tokens", "tokens"), ("slots", "slots"), ("time", "seconds")):
            window[key] += numbers[name]
        window["steps"] += 1
        if on_step:
            on_step(step, numbers)
        show_progress(cfg, run, progress, step, numbers)
        if step % cfg.log_interval == 0 or step == run.total:
            record = log_line(window, step, run.total, run.optimizer, run.world, run.log, log_file,
                              progress[0].timing(step - progress[1]), getattr(run.model, "likelihood_weight", None))
            if run.tracker:
                run.tracker.log(record, step)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < run.total and run.eval_sets:
            metrics, fits = evaluate_splits(cfg, run)
            run.log(f"step {step} eval: " + eval_text(metrics, fits))
            report_eval(cfg, run, step, metrics)
        if step in (run.total, stop_after) or (cfg.save_interval and step % cfg.save_interval == 0):
            full = distributed.full_state(run.model, run.optimizer) if run.sharded else None  # all gather, 0 writes
            if run.rank == 0:
                distributed.save_checkpoint(ckpt_dir, run.model, run.optimizer,
                                            {"step": step, "config": dataclasses.asdict(cfg)}, full)
        if step == stop_after:
            return {}
    metrics = final_evaluation(cfg, run, step, log_file)
    distributed.finish()
    return metrics


def train_step(cfg, run, step):
    """One optimizer step on this process's share of the step's pairs -> the step's numbers (see train)."""
    t0 = time.perf_counter()
    epoch, index = divmod(step, run.steps_per_epoch)
    if run.epoch_order[0] != epoch:  # once per epoch: a few bytes per pair
        run.epoch_order = (epoch, epoch_batches(run.examples, cfg.batch_size, cfg.seed, epoch))
    step_examples = [run.examples[i] for i in run.epoch_order[1][index]]
    lm_tokens = sum(len(ex.teacher[1]) for ex in step_examples if ex.teacher) if cfg.use_lm else 0
    mine = step_examples[run.rank * run.micro * run.accum:(run.rank + 1) * run.micro * run.accum]
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, run.total, group.get("peak", run.lr), cfg)  # no "peak": an older checkpoint
    totals = torch.zeros(4, dtype=torch.float64, device=run.device)  # pair loss, lm loss, correct, pairs
    tokens = slots = shared = separate = 0
    for k in range(run.accum):
        batch = to_device(collate(mine[k * run.micro:(k + 1) * run.micro], run.model.pad_id, cfg.use_lm,
                                  cfg.loss in NEEDS_MARGINS, run.layout, run.key_cost), run.device)
        sync = run.world == 1 or k == run.accum - 1
        no_sync = not sync and hasattr(run.forward_model, "no_sync")
        with run.forward_model.no_sync() if no_sync else contextlib.nullcontext():
            with run.autocast:
                loss, pair, lm, correct = step_loss(run.forward_model, batch, cfg.loss, cfg.lm_weight, cfg.batch_size,
                                                    max(1, lm_tokens))
            loss.mul(run.world).backward()  # DDP averages over processes; we want the sum
        # kept on the device: one host sync per step (at the all-reduce / tolist), not per micro-batch
        totals += torch.stack([pair.detach().double(), lm.detach().double(), correct.double(),
                               totals.new_tensor(batch.n_pairs)])
        tokens += batch.real_tokens
        slots += batch.input_ids.numel()
        shared, separate = shared + batch.shared_pairs, separate + batch.separate_pairs
    if run.world > 1:  # the step's loss over all processes, not rank 0's share
        distributed.all_reduce_sum(totals)
    pair, lm, correct, pairs = totals.tolist()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"pair_loss": pair, "lm_loss": lm, "correct": int(correct), "pairs": int(pairs), "tokens": tokens,
            "slots": slots, "shared_pairs": shared, "separate_pairs": separate, "seconds": time.perf_counter() - t0}


def evaluate_splits(cfg, run, rewards=None):
    """-> ({split: accuracy}, {split: margin_fit} for the splits whose pairs all have margins); rewards: a dict
    that gets {split: [(r(chosen), r(rejected))]}."""
    results = {name: pair_accuracy(run.model, data, cfg.eval_batch, run.device, run.autocast,
                                   None if rewards is None else rewards.setdefault(name, []), run.layout)
               for name, data in run.eval_sets.items()}
    return ({name: acc for name, (acc, _) in results.items()},
            {name: fit for name, (_, fit) in results.items() if fit is not None})


def eval_text(metrics, fits):
    return ", ".join(f"{k} {v:.4f}" + (f" ({fit_text(fits[k])})" if k in fits else "") for k, v in metrics.items())


def final_evaluation(cfg, run, step, log_file):
    """The final evaluation; rank 0 saves the reward model and eval.json and says where everything is."""
    eval_rewards = {}
    metrics, fits = evaluate_splits(cfg, run, eval_rewards)
    if cfg.lora_r:  # saved merged: every loader reads a plain model, no peft needed
        lora.merge_adapters(run.model)
    weights = distributed.full_state(run.model) if run.sharded else None
    if run.rank == 0:
        save_reward_model(run.model, os.path.join(cfg.out, "model"), weights)
        result = {"step": step, "accuracy": metrics, "margin_fit": fits,
                  "train_data": dataclasses.asdict(run.stats),
                  "eval_data": {k: dataclasses.asdict(v) for k, v in run.eval_stats.items()},
                  "eval_pairs": {k: len(v) for k, v in run.eval_sets.items()}}
        with open(os.path.join(cfg.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        run.log("final eval: " + (eval_text(metrics, fits) or "no --eval-data given"))
        report_path = report_final(cfg, run, step, metrics, eval_rewards)
        ckpt_dir = os.path.join(cfg.out, "ckpt")
        ckpt = ckpt_dir if os.path.exists(ckpt_dir) else "none (no step trained)"
        run.log(f"model: {os.path.join(cfg.out, 'model')}  checkpoint: {ckpt}  metrics: "
                f"{os.path.join(cfg.out, 'eval.json')}  report: {report_path}")
        log_file.close()
    return metrics


def show_progress(cfg, run, progress, step, numbers):
    """The progress bar on a terminal (stderr, redrawn every step; it ends its line where a log line follows), or one
    line after the first step in a log (the log lines carry elapsed time and ETA from then on); rank 0 only."""
    clock, start = progress
    if run.rank == 0 and (clock.tty or step == start + 1):
        accuracy = numbers["correct"] / max(1, numbers["pairs"])
        clock.update(step - start, f"pair {numbers['pair_loss']:.4f}  acc {accuracy:.2f}",
                     final=clock.tty and (step % cfg.log_interval == 0 or step == run.total))


def log_line(window, step, total, optimizer, world, log, log_file, timing="", likelihood_weight=None):
    """One line per interval: step, loss parts, accuracy, lr, tokens/s, padding %, ms/step (the likelihood term's
    weight when there is one), elapsed time and ETA; then reset the window."""
    steps = window["steps"]
    record = {"step": step, "pair_loss": window["pair"] / steps, "lm_loss": window["lm"] / steps,
              "accuracy": window["correct"] / max(1, window["pairs"]), "lr": optimizer.param_groups[0]["lr"],
              "tokens_per_s": window["tokens"] * world / window["time"],
              "padding": 1 - window["tokens"] / max(1, window["slots"]), "ms_per_step": 1000 * window["time"] / steps}
    if likelihood_weight is not None:  # how much the frozen copy's likelihood counts by now (FSDP: rank 0's shard)
        local = likelihood_weight.to_local() if hasattr(likelihood_weight, "to_local") else likelihood_weight
        record["likelihood_weight"] = local.detach().float().sum().item()
    log(f"step {step}/{total} | pair {record['pair_loss']:.4f} | lm {record['lm_loss']:.4f} | "
        f"acc {record['accuracy']:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s | "
        f"pad {100 * record['padding']:.1f}% | {record['ms_per_step']:.0f} ms/step" +
        (f" | likelihood w {record['likelihood_weight']:.3f}" if likelihood_weight is not None else "") +
        (f" | {timing}" if timing else ""))
    if log_file:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    for key in window:
        window[key] = 0 if isinstance(window[key], int) else 0.0
    return record


# ----------------------------------------------------------------------------------------------------------------
# report.html and --report-to


def report_eval(cfg, run, step, metrics):
    """An evaluation during training -> eval_log.jsonl (the report's accuracy-over-steps chart) and the tracker."""
    if run.rank == 0:
        report.append_eval(cfg.out, step, metrics)
        if run.tracker:
            run.tracker.log({f"eval_accuracy/{k}": v for k, v in metrics.items()}, step)


def report_final(cfg, run, step, metrics, eval_rewards):
    """The final evaluation -> eval_rewards.json (the report's reward histograms) and the tracker, which is closed;
    then report.html -> its path. Rank 0 only."""
    report.save_eval_rewards(cfg.out, eval_rewards)
    if run.tracker:
        run.tracker.log({f"eval_accuracy/{k}": v for k, v in metrics.items()}, step)
        run.tracker.close()
    return report.train_report(cfg.out)


@dataclass
class Tracker:
    """An experiment tracker for --report-to: log(record, step) the scalars of a log.jsonl record; close()."""
    log: object
    close: object


def scalars(record):
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def open_tracker(kind, out, config):
    """--report-to: None for "none"; else a Tracker. A missing package is a one-line error naming it."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--report-to=tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or --report-to=none)") from None
        writer = SummaryWriter(os.path.join(out, "tensorboard"))

        def log(record, step):
            for key, value in scalars(record).items():
                writer.add_scalar(key, value, step)
        return Tracker(log, writer.close)
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise UsageError("--report-to=wandb needs the wandb package: pip install wandb "
                             "(or --report-to=none)") from None
        wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rmd"), config=config, dir=out)
        return Tracker(lambda record, step: wandb_run.log(scalars(record), step=step), wandb_run.finish)
    raise UsageError(f"--report-to must be one of none, tensorboard, wandb, got {kind!r}")

