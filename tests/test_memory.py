"""Issue 12, item 6: memory for real students. --gradient-checkpointing gives the same loss and gradients (it only
recomputes); LoRA (lora.py, optional peft) trains few parameters, resumes, and is saved merged so that every loader
reads it without peft."""
import importlib.util
import os
import sys

import pytest
import torch

import batches
import lora  # imports peft only when adapters are added
import train
from conftest import easy_rows, log_losses, tiny_model, train_cfg, train_tiny, write_jsonl
from demo import tiny_lm
from formats import UsageError
from model import checkpoint_activations, load_reward_model, save_reward_model


def packed_batch(model, tmp_path, n=6):
    """A packed batch with position ids restarting per sequence and teacher-answer rows, as train builds it."""
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "b.jsonl", easy_rows(n)), model.tokenizer, 64, teacher=True)
    batch = batches.collate(examples, model.pad_id, True, True)
    assert (batch.position_ids[:, 1:] == 0).any()  # several sequences share a row
    return batch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)  # mse: the batch carries margins (collate(..., True, True))
    loss, _, _, _ = train.step_loss(model, batch, "mse", 0.5, batch.n_pairs, len(batch.lm_target))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ checkpointing

def saved_tensors(fn):
    """(fn(), how many tensors autograd saved for backward while fn ran its forward)."""
    count = [0]

    def pack(t):
        count[0] += 1
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, count[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    plain = tiny_model(seed=0).train()
    ckpt = tiny_model(seed=0).train()
    checkpoint_activations(ckpt.lm)  # what --gradient-checkpointing does
    batch = packed_batch(plain, tmp_path)
    (loss_a, grads_a), saved_a = saved_tensors(lambda: loss_and_grads(plain, batch))
    (loss_b, grads_b), saved_b = saved_tensors(lambda: loss_and_grads(ckpt, batch))
    assert saved_b < saved_a / 2  # the layers' activations were not kept for backward: checkpointing is on
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:  # fp32 on CPU: the recomputed forward is the same arithmetic
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_train_with_gradient_checkpointing_matches_a_plain_run(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    runs = []
    for on in (False, True):
        cfg = train_cfg(tmp_path, data, out=str(tmp_path / f"out{on}"), max_steps=3, batch_size=4, max_len=64,
                        dropout=0.0, gradient_checkpointing=on)
        train_tiny(cfg)
        runs.append(log_losses(cfg.out))
    for (s1, p1, l1), (s2, p2, l2) in zip(*runs, strict=True):
        assert s1 == s2 and p2 == pytest.approx(p1, rel=1e-5, abs=1e-6) and l2 == pytest.approx(l1, rel=1e-5)


# ------------------------------------------------------------------------------------------------ LoRA

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="LoRA needs the optional peft package: pip install peft")


@needs_peft
def test_lora_freezes_the_backbone_but_not_the_heads():
    model = tiny_model(seed=0)
    total = sum(p.numel() for p in model.parameters())
    trainable, counted = lora.add_adapters(model, r=4, alpha=8, dropout=0.0)
    assert counted > total  # the adapters were added
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    heads = sum(p.numel() for p in model.value_head.parameters()) + model.lm.get_output_embeddings().weight.numel()
    assert trainable == adapters + heads < total / 2
    assert adapters == 4 * 4 * (4 * (128 + 128) + 3 * (128 + 384))  # r * layers * (4 attn + 3 mlp) * (in + out)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("norm" in n or "base_layer" in n for n in frozen)


@needs_peft
def test_lora_is_saved_merged_and_loads_without_peft(tmp_path, monkeypatch):
    model = tiny_model(seed=0)
    lora.add_adapters(model, r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():  # trained adapters: B is zero at init, give it something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rows = easy_rows(6, seed=2)
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    with_adapters = model.score(prompts, answers)
    lora.merge_adapters(model)
    merged = model.score(prompts, answers)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(torch.tensor(merged), torch.tensor(with_adapters), atol=1e-4, rtol=1e-4)
    path = str(tmp_path / "model")
    save_reward_model(model, path)
    monkeypatch.setitem(sys.modules, "peft", None)  # loading must not need peft
    loaded = load_reward_model(path)
    torch.testing.assert_close(torch.tensor(loaded.score(prompts, answers)), torch.tensor(merged), atol=1e-6,
                               rtol=1e-6)
    assert not os.path.exists(os.path.join(path, "adapter_config.json"))


@pytest.mark.slow
@needs_peft
def test_lora_training_moves_only_low_rank_deltas_and_resumes(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(24))
    kw = dict(max_steps=4, batch_size=4, max_len=64, lora_r=2, lora_alpha=4.0, dropout=0.0, lr=1e-2)
    straight = train_cfg(tmp_path, data, out=str(tmp_path / "straight"), **kw)
    train_tiny(straight)
    losses = log_losses(straight.out)
    assert losses[-1][1] < losses[0][1]  # it learns
    torch.manual_seed(straight.seed)  # train's init of the same backbone
    init, _ = tiny_lm.load_tiny("tiny-scratch", 0, 64)
    saved = load_reward_model(os.path.join(straight.out, "model")).lm
    w0, w1 = init.model.layers[1].self_attn.q_proj.weight, saved.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(w0, w1) and torch.linalg.matrix_rank(w1 - w0, atol=1e-5) <= 2  # a merged rank-2 update
    torch.testing.assert_close(saved.model.layers[1].input_layernorm.weight, init.model.layers[1].input_layernorm.weight,
                               atol=0, rtol=0)  # frozen
    cut = train_cfg(tmp_path, data, out=str(tmp_path / "cut"), **kw)
    train_tiny(cut, stop_after=2)
    train_tiny(train.TrainConfig(**{**vars(cut), "resume": True}))
    for (s1, p1, l1), (s2, p2, l2) in zip(losses, log_losses(cut.out), strict=True):
        assert s1 == s2 and p2 == pytest.approx(p1, abs=1e-6, rel=1e-6)
    rows = easy_rows(4, seed=3)
    a = load_reward_model(os.path.join(straight.out, "model")).score([r["prompt"] for r in rows],
                                                                         [r["chosen"] for r in rows])
    b = load_reward_model(os.path.join(cut.out, "model")).score([r["prompt"] for r in rows],
                                                                    [r["chosen"] for r in rows])
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)


def test_lora_errors_are_one_line(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(8))
    with pytest.raises(UsageError, match="^need --lora-r >= 0"):
        train.validate(train_cfg(tmp_path, data, lora_r=-1))
    with pytest.raises(UsageError, match="LoRA with --fsdp is not supported"):
        train.validate(train_cfg(tmp_path, data, lora_r=4, fsdp=True))
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UsageError, match="^--lora-r needs the peft package: pip install peft"):
        lora.add_adapters(tiny_model(), r=4, alpha=8, dropout=0.0)
