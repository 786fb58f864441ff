"""GPU benchmark of rmd's training step: one table, a few minutes on one H100/H200, nothing downloaded.

    python -m tools.bench_gpu                     # Qwen2.5-0.5B-shaped student (random weights), bf16, 1k and 2k tokens
    python -m tools.bench_gpu --device cpu --tiny   # the same code paths at a toy size (checks the script, not the GPU)

Needs only torch and transformers (plus model.py, batches.py, train.py and loss.py from this folder); TRL's
RewardTrainer is timed too when `trl` and `datasets` import (carry their wheels, `pip install --no-deps`, if the
image lacks them).

Each step is rmd's training step: 4 pairs + their 4 teacher-answer rows (synthetic token ids, each row `seq` tokens,
one sequence per row so there is no padding), bf16 autocast over fp32 weights, pairwise MSE loss + lm_weight * LM
term on the teacher-answer tokens, backward, gradient clipping, fused AdamW. Variants:
  eager/fused      the LM term as rmd computes it (loss.linear_cross_entropy: logits never materialised)
  eager/naive      (hidden @ W.T).float() + F.cross_entropy on the same tokens
  compiled/fused   torch.compile(model) (rmd's --compile=on; the LM term stays eager by design)
  eager/LM off     pairs only: the comparison point for TRL (which has no LM term)
  shared/...       the same with each pair's prompt computed once (batches.collate layout="shared": the prompt is
                   3/4 of every row here), SDPA with a dense [rows, 1, slots, slots] bool mask
  flex shared/...  the same through FlexAttention's BlockMask (attn_implementation "flex_attention"; CUDA only):
                   the blocks no answer sees are skipped
  TRL              RewardTrainer, bf16, same pair rows, no gradient checkpointing, no eval, no logging
MFU = model FLOPs / time / peak dense bf16 FLOPs of the card (H100/H200 SXM: 989 TFLOPS), model FLOPs per step =
6 x non-embedding params x tokens + 6 x layers x hidden x seq x tokens (causal attention) + 6 x hidden x vocab x
LM tokens (the LM head runs on the teacher-answer tokens only, in every variant).
"""

if not __package__:  # run as a file: the repository's modules are importable only from its root
    raise SystemExit("error: run it from the repository root as a module: python -m tools.bench_gpu")

import contextlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import train
from batches import Example, collate, to_device
from cli import one_line_errors, parse_overrides
from model import RewardModel
from tools.common import print_table

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


class StubTokenizer:
    """RewardModel reads only the pad and eos ids from its tokenizer."""
    pad_token_id, eos_token_id = 0, 1


def qwen_config(tiny):
    from transformers import Qwen2Config
    if tiny:
        return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0,
                       eos_token_id=1)


def synthetic_examples(n_pairs, seq, vocab, seed):
    """Pairs whose every row (prompt + answer) is exactly `seq` tokens; the answer is the last quarter."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
    answer = seq // 4
    examples = []
    for _ in range(n_pairs):
        prompt = ids(seq - answer)
        examples.append(Example(prompt=(prompt, prompt), chosen=ids(answer - 1) + [1],
                                    rejected=ids(answer - 1) + [1], margin=float(torch.randint(1, 9, (1,), generator=g)),
                                    teacher=(prompt, ids(answer - 1) + [1])))
    return examples


def naive_lm_loss(hidden, weight, labels):
    """The LM term as people write it: full logits, then cross-entropy (the twin of loss.linear_cross_entropy)."""
    return F.cross_entropy((hidden @ weight.to(hidden.dtype).T).float(), labels)


def step(model, optimizer, batch, lm, lm_weight, autocast):
    """One training step of rmd: train.step_loss (mse + lm_weight x the LM term; lm "naive" swaps in the naive LM
    loss, "off" sets lm_weight 0), backward, clipping, AdamW."""
    with autocast:
        loss, _, _, _ = train.step_loss(model, batch, "mse", 0.0 if lm == "off" else lm_weight, batch.n_pairs,
                                        max(1, len(batch.lm_target)),
                                        **({"lm_loss": naive_lm_loss} if lm == "naive" else {}))
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variant(model, batch, lm, args, autocast):
    """(seconds per step: median, peak memory GiB or nan) after warm-up."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=args.device.startswith("cuda") or None)
    for _ in range(args.warmup):
        step(model, optimizer, batch, lm, 0.1, autocast)
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(model, optimizer, batch, lm, 0.1, autocast)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    del optimizer
    return statistics.median(times), peak


def time_trl(args, config, examples):
    """TRL's RewardTrainer on the pair rows of `examples`; median seconds per step, peak GiB."""
    from datasets import Dataset
    from transformers import Qwen2ForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t1")
    settings = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    model = Qwen2ForSequenceClassification(config.__class__(**settings, num_labels=1))
    cuda = args.device.startswith("cuda")
    times = []

    class StepTimes(TrainerCallback):
        last = None

        def on_step_begin(self, *a, **k):
            sync(args.device)
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(args.device)
            times.append(time.perf_counter() - self.last)
            if len(times) == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    n = args.warmup + args.steps
    rows = (examples * n)[:len(examples) * n]
    dataset = Dataset.from_dict({"chosen_ids": [ex.prompt[0] + ex.chosen for ex in rows],
                                 "rejected_ids": [ex.prompt[1] + ex.rejected for ex in rows]})
    out = tempfile.mkdtemp(prefix="rmd-bench-gpu-trl-")
    cfg = RewardConfig(output_dir=out, per_device_train_batch_size=len(examples), max_steps=n,
                       max_length=None, learning_rate=1e-5, bf16=cuda, fp16=False, use_cpu=not cuda,
                       gradient_checkpointing=False, dataloader_num_workers=0, logging_steps=10**6,
                       save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[StepTimes()])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times[args.warmup:]), peak


def model_flops(config, tokens, seq, lm_tokens, n_params):
    embed = config.vocab_size * config.hidden_size
    return (6 * (n_params - embed) * tokens + 6 * config.num_hidden_layers * config.hidden_size * seq * tokens
            + 6 * config.hidden_size * config.vocab_size * lm_tokens)


@dataclass
class GpuBenchConfig:
    device: str = "cuda"  # cuda, cuda:1, ... or cpu (with --tiny: checks the script, not the GPU)
    tiny: bool = False  # toy model and lengths (to check the script on a CPU)
    seq: str = ""  # tokens per row, comma-separated (default 1024,2048; with --tiny 64,128)
    pairs: int = 4  # pairs per step (plus as many teacher rows)
    steps: int = 5  # timed steps per variant
    warmup: int = 2  # untimed steps first
    no_compile: bool = False  # skip the torch.compile variants
    no_trl: bool = False  # skip TRL's RewardTrainer
    no_flex: bool = False  # skip the FlexAttention variants (CUDA only)
    peak_tflops: float = 0.0  # peak dense bf16 TFLOPS (0 = by card)


def trl_importable():
    try:
        import trl  # noqa: F401
        import datasets  # noqa: F401
        return True
    except ImportError:
        print("TRL or datasets not importable: the TRL row is skipped")
        return False


def main():
    args = parse_overrides(GpuBenchConfig(), sys.argv[1:], "python -m tools.bench_gpu", "rmd's training step on one "
                           "GPU: eager/compiled, fused/naive/no LM term, and TRL's RewardTrainer.")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False). Run it on a GPU "
                         "machine, or check the script's logic with: python -m tools.bench_gpu --device cpu --tiny")
    try:
        seqs = [int(x) for x in args.seq.split(",")] if args.seq else ([64, 128] if args.tiny else [1024, 2048])
    except ValueError:
        raise SystemExit(f"error: --seq={args.seq!r}: expected token counts, comma-separated") from None
    card = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), 0.0)
    import transformers
    print(f"device: {card}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peak bf16 {peak_tflops or 'unknown'} TFLOPS" + (f", CUDA {torch.version.cuda}" if cuda else ""))
    torch.backends.cuda.matmul.allow_tf32 = True
    config = qwen_config(args.tiny)
    # bf16 autocast on the GPU, as `rmd.py train` does there; fp32 on a CPU, as rmd (and TRL here) do there
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)
    torch.manual_seed(0)
    from transformers import Qwen2ForCausalLM
    lm = Qwen2ForCausalLM(config)
    model = RewardModel(lm, StubTokenizer(), "mlp", 0.0).to(args.device)
    n_params = sum(p.numel() for p in lm.parameters())
    have_trl = not args.no_trl and trl_importable()
    rows = []
    t_start = time.perf_counter()
    for seq in seqs:
        examples = synthetic_examples(args.pairs, seq, config.vocab_size, seq)
        batch = to_device(collate(examples, 0, True, True), args.device)
        pair_batch = to_device(collate(examples, 0, False, True), args.device)
        shared = {lm: to_device(collate(examples, 0, lm, True, layout="shared"), args.device) for lm in (True, False)}
        lm_tokens = len(batch.lm_target)
        variants = [("eager", "fused", model, batch), ("eager", "naive", model, batch),
                    ("eager", "off", model, pair_batch), ("shared", "fused", model, shared[True]),
                    ("shared", "off", model, shared[False])]
        if cuda and not args.no_flex:
            variants += [("flex shared", "fused", model, shared[True]), ("flex shared", "off", model, shared[False])]
        if not args.no_compile:
            compiled = torch.compile(model)
            variants.insert(1, ("compiled", "fused", compiled, batch))
            variants.append(("compiled", "off", compiled, pair_batch))
        results = []
        for mode, lm_variant, forward, b in variants:
            t0 = time.perf_counter()
            lm.set_attn_implementation("flex_attention" if mode.startswith("flex") else "sdpa")
            seconds, peak = time_variant(forward, b, lm_variant, args, autocast)
            results.append((mode, lm_variant, b.real_tokens, lm_tokens if lm_variant != "off" else 0, seconds, peak))
            print(f"  seq {seq} {mode}/{lm_variant}: {1000 * seconds:.0f} ms/step ({time.perf_counter() - t0:.0f} s "
                  "with warm-up)", file=sys.stderr, flush=True)
        if have_trl:
            seconds, peak = time_trl(args, config, examples)
            results.append(("TRL", "off", pair_batch.real_tokens, 0, seconds, peak))
        base = {lm_v: s for mode, lm_v, _, _, s, _ in results if mode == "eager"}
        for mode, lm_variant, tokens, lm_t, seconds, peak in results:
            flops = model_flops(config, tokens, seq, lm_t, n_params)
            mfu = f"{100 * flops / seconds / (peak_tflops * 1e12):.1f}" if peak_tflops else "n/a"
            ref = base["off" if lm_variant == "off" else "fused"]  # shared and flex: vs eager unshared
            rows.append([seq, f"{mode}/{'LM ' + lm_variant if lm_variant != 'off' else 'LM off'}", tokens,
                         f"{tokens / seconds:.0f}", f"{1000 * seconds:.0f}", mfu, f"{peak:.1f}",
                         f"{ref / seconds:.2f}"])
    print_step_table(args, n_params, cuda, card, rows)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


def print_step_table(args, n_params, cuda, card, rows):
    print_table(f"bench_gpu: rmd training step, {'tiny Qwen2' if args.tiny else 'Qwen2.5-0.5B-shaped'} "
                f"({n_params / 1e6:.1f}M params, random weights), {'bf16 autocast' if cuda else 'fp32'}, {args.pairs} "
                f"pairs + {args.pairs} teacher rows/step, median of {args.steps} steps after {args.warmup} warm-up, on "
                f"{card}; speed vs = vs eager with the same LM setting (TRL: vs eager/LM off)",
                ["seq", "variant", "tokens/step", "tokens/s", "ms/step", "MFU %", "peak GiB", "speed vs eager"], rows)


if __name__ == "__main__":
    with one_line_errors():
        main()
