"""Benchmarks for rmd: each section times an optimised piece against its naive twin and prints a table.

    python bench.py                      # every section
    python bench.py --only lm            # one section: lm, pairwise
    python bench.py --only lm --reps 1 --tokens 8192 --vocab 49152

Add a section: write `bench_<name>(args)` that prints its own table, and list it in SECTIONS.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from loss import linear_cross_entropy, pairwise_loss


def print_table(title, headers, rows):
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n## {title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def machine_description():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = proc_kib("/proc/meminfo", "MemTotal") / 2**20
    return (f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"RAM {mem:.0f} GiB, torch {torch.__version__}, python {platform.python_version()}")


def proc_kib(path, field):
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def median_seconds(fn, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- section "lm"

def naive_lm_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


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
    cmd = [sys.executable, os.path.abspath(__file__), "--lm-worker", mode, str(hidden_size), str(vocab_size),
           str(n_tokens), "--reps", str(reps)] + (["--chunk-size", str(chunk_size)] if chunk_size else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
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


SECTIONS = {"lm": bench_lm, "pairwise": bench_pairwise}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--reps", type=int, default=3, help="lm: timed runs per variant (median)")
    parser.add_argument("--tokens", type=int, action="append", help="lm: token counts (default 1024 4096 8192)")
    parser.add_argument("--vocab", type=int, action="append", help="lm: only these vocab sizes (49152, 151936)")
    parser.add_argument("--chunk-size", type=int, default=None, help="lm: linear_cross_entropy chunk_size")
    parser.add_argument("--lm-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lm_worker:
        variant, hidden_size, vocab_size, n_tokens = args.lm_worker
        lm_worker(variant, int(hidden_size), int(vocab_size), int(n_tokens), args.reps, args.chunk_size)
        return
    print(machine_description())
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
