"""loss.py against its naive twins: loss and every gradient, fp32 and bf16, eager and compiled.

Run: python -m pytest -q tests/test_loss.py
"""

import pytest
import torch
import torch.nn.functional as F

from loss import PAIRWISE_KINDS, linear_cross_entropy, pairwise_loss

TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4), torch.bfloat16: dict(atol=5e-3, rtol=5e-2)}


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ----------------------------------------------------------------------------- naive twins

def naive_pairwise(chosen_rewards, rejected_rewards, margins, kind):
    reward_gap = chosen_rewards - rejected_rewards
    if kind == "mse":
        return ((reward_gap - margins) ** 2).mean()
    if kind == "bt-margin":
        return -F.logsigmoid(reward_gap - margins).mean()
    return -F.logsigmoid(reward_gap).mean()


def naive_lm(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.view(-1, weight.shape[0]), labels.view(-1), ignore_index=-100)


def fused_and_naive(fn, naive, leaves, *args, dtype):
    """Run both on copies of the same leaves (cast to dtype); return (fused, naive) losses and grads.

    The bf16 reference runs in fp32 on the same bf16-rounded inputs: that is the exact answer the bf16
    inputs define, so the tolerance measures only the fused code's own rounding (a bf16 reference would
    add its own, larger, logit rounding on top).
    """
    mine = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in leaves]
    ref = [x.detach().to(dtype).float().requires_grad_(x.requires_grad) for x in leaves]
    out = []
    for inputs, f in ((mine, fn), (ref, naive)):
        loss = f(*inputs, *args)
        grads = torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])
        out.append((loss, grads))
    for x, g in zip([x for x in mine if x.requires_grad], out[0][1]):
        assert g.dtype == x.dtype and g.shape == x.shape
    return out


# ----------------------------------------------------------------------------- pairwise_loss

def pair_batch(batch_size=16, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chosen_rewards = (torch.randn(batch_size, generator=gen) * scale).requires_grad_()
    rejected_rewards = (torch.randn(batch_size, generator=gen) * scale).requires_grad_()
    margins = torch.randint(1, 9, (batch_size,), generator=gen).float()
    return chosen_rewards, rejected_rewards, margins


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", PAIRWISE_KINDS)
def test_pairwise_matches_naive(kind, dtype):
    chosen_rewards, rejected_rewards, margins = pair_batch()
    leaves = [chosen_rewards, rejected_rewards] + ([] if kind == "bt" else [margins])
    if kind == "bt":
        fused, naive = lambda c, r: pairwise_loss(c, r, None, kind), lambda c, r: naive_pairwise(c, r, None, kind)
    else:
        fused, naive = lambda c, r, m: pairwise_loss(c, r, m, kind), lambda c, r, m: naive_pairwise(c, r, m, kind)
    (loss, grads), (ref_loss, ref_grads) = fused_and_naive(fused, naive, leaves, dtype=dtype)
    assert loss.dtype == torch.float32
    close(loss, ref_loss, dtype)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, dtype)


@pytest.mark.parametrize("kind", PAIRWISE_KINDS)
def test_pairwise_gradcheck(kind):
    chosen_rewards, rejected_rewards, margins = (x.detach().double().requires_grad_() for x in pair_batch(5))
    if kind == "bt":
        assert torch.autograd.gradcheck(lambda c, r: pairwise_loss(c, r, None, kind),
                                         (chosen_rewards, rejected_rewards))
    else:  # margins with requires_grad get a gradient too
        assert torch.autograd.gradcheck(lambda c, r, m: pairwise_loss(c, r, m, kind),
                                         (chosen_rewards, rejected_rewards, margins))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", PAIRWISE_KINDS)
def test_pairwise_large_reward_gap_is_finite(kind, dtype):
    chosen_rewards = torch.tensor([1e4, -1e4, 5e3, -3.0, 0.0], dtype=dtype, requires_grad=True)
    rejected_rewards = torch.tensor([0.0, 0.0, -5e3, 2.0, 1e4], dtype=dtype, requires_grad=True)
    margins = None if kind == "bt" else torch.tensor([2.0, 9.0, 1.0, 3.0, 4.0])
    loss = pairwise_loss(chosen_rewards, rejected_rewards, margins, kind)
    grads = torch.autograd.grad(loss, (chosen_rewards, rejected_rewards))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    c, r = (x.detach().float().requires_grad_() for x in (chosen_rewards, rejected_rewards))
    ref_loss = naive_pairwise(c, r, margins, kind)  # logsigmoid: the stable naive form
    ref_grads = torch.autograd.grad(ref_loss, (c, r))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, dtype)
    if kind != "mse":  # the textbook -log(sigmoid(z)) is not: it overflows where pairwise_loss does not
        assert torch.isinf(-torch.log(torch.sigmoid(c.detach() - r.detach()))).any()


def test_pairwise_uses_each_pairs_own_margin():
    """Fails if the margins were broadcast [B] against [B, 1] (pulled to the batch-mean margin)."""
    chosen_rewards, rejected_rewards, margins = pair_batch(8)
    per_pair = sum((chosen_rewards[i] - rejected_rewards[i] - margins[i]) ** 2 for i in range(8)) / 8
    torch.testing.assert_close(pairwise_loss(chosen_rewards, rejected_rewards, margins), per_pair)
    broadcast = ((chosen_rewards - rejected_rewards) - margins[:, None]).square().mean()
    assert (broadcast - per_pair).abs() > 1.0  # the bug would be visible with these inputs
    # A student that already predicts every pair's own margin has nothing left to learn.
    rejected_rewards = torch.arange(8.0)  # integers: Δr - Δs is exactly 0, no rounding
    chosen_rewards = (rejected_rewards + margins).requires_grad_()
    loss = pairwise_loss(chosen_rewards, rejected_rewards, margins)
    (grad,) = torch.autograd.grad(loss, chosen_rewards)
    assert loss.item() == 0.0 and not grad.any()


def test_pairwise_accepts_integer_margins_and_any_equal_shape():
    chosen_rewards, rejected_rewards, margins = pair_batch(6)
    expected = pairwise_loss(chosen_rewards, rejected_rewards, margins, "bt-margin")
    torch.testing.assert_close(pairwise_loss(chosen_rewards, rejected_rewards, margins.long(), "bt-margin"), expected)
    torch.testing.assert_close(pairwise_loss(chosen_rewards.view(6, 1), rejected_rewards.view(6, 1),
                                             margins.view(6, 1), "bt-margin"), expected)


@pytest.mark.parametrize("kind", PAIRWISE_KINDS)
def test_pairwise_rejects_mixed_shapes(kind):
    chosen_rewards, rejected_rewards, margins = pair_batch(4)
    margins = None if kind == "bt" else margins
    with pytest.raises(ValueError, match="shapes must be identical"):
        pairwise_loss(chosen_rewards, rejected_rewards.view(4, 1), margins, kind)
    if margins is not None:
        with pytest.raises(ValueError, match="shapes must be identical"):
            pairwise_loss(chosen_rewards, rejected_rewards, margins.view(4, 1), kind)
        with pytest.raises(ValueError, match="shapes must be identical"):
            pairwise_loss(chosen_rewards, rejected_rewards, margins[:3], kind)


def test_pairwise_errors_say_what_to_do():
    chosen_rewards, rejected_rewards, margins = pair_batch(4)
    with pytest.raises(ValueError, match="'mse', 'bt-margin', 'bt'"):
        pairwise_loss(chosen_rewards, rejected_rewards, margins, kind="hinge")
    for kind in ("mse", "bt-margin"):
        with pytest.raises(ValueError, match="needs margins"):
            pairwise_loss(chosen_rewards, rejected_rewards, None, kind)
    with pytest.raises(ValueError, match="does not use margins"):
        pairwise_loss(chosen_rewards, rejected_rewards, margins, "bt")
    with pytest.raises(ValueError, match="zero pairs"):
        pairwise_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_pairwise_under_torch_compile():
    chosen_rewards, rejected_rewards, margins = pair_batch(8)

    def step(c, r, m):
        return pairwise_loss(c * 2.0, r, m, "bt-margin") + pairwise_loss(c, r, m, "mse")

    # fullgraph: dynamo traces the autograd.Function with no graph break, and AOTAutograd builds its forward and
    # backward graphs. aot_eager runs those graphs without inductor's code generation, which cost ~50 s cold on a
    # CPU for these few elementwise ops; inductor itself is exercised by test_lm_under_torch_compile.
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(chosen_rewards, rejected_rewards, margins)
    grads = torch.autograd.grad(loss, (chosen_rewards, rejected_rewards))
    ref = naive_pairwise(chosen_rewards * 2.0, rejected_rewards, margins, "bt-margin") + \
        naive_pairwise(chosen_rewards, rejected_rewards, margins, "mse")
    ref_grads = torch.autograd.grad(ref, (chosen_rewards, rejected_rewards))
    close(loss, ref, torch.float32)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, torch.float32)


# ----------------------------------------------------------------------------- linear_cross_entropy

def lm_batch(batch_size, seq_len, hidden_size, vocab_size, seed=0, ignored_fraction=0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, seq_len, hidden_size, generator=gen).requires_grad_()
    # ~1/sqrt(H) keeps logits O(1), like a trained LM head, so softmax is neither flat nor one-hot.
    weight = (torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    labels[torch.rand(batch_size, seq_len, generator=gen) < ignored_fraction] = -100
    labels[1] = -100  # a row with nothing to predict (all prompt / padding)
    return hidden, weight, labels


SHAPES = [(4, 48, 32, 128), (4, 47, 31, 123)]  # (B, T, H, V): even and odd


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=["even", "odd"])
def test_lm_matches_naive(shape, dtype, chunk_size):
    hidden, weight, labels = lm_batch(*shape)
    (loss, grads), (ref_loss, ref_grads) = fused_and_naive(
        lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=chunk_size),
        lambda h, w: naive_lm(h, w, labels), [hidden, weight], dtype=dtype)
    assert loss.dtype == torch.float32
    close(loss, ref_loss, dtype)
    for g, rg in zip(grads, ref_grads):
        close(g, rg, dtype)
    assert not grads[0][1].any()  # the all-ignored row gets exactly zero gradient


def test_lm_flat_input_no_ignored_tokens_and_scaled_backward():
    hidden, weight, labels = lm_batch(2, 37, 16, 50, ignored_fraction=0.0)
    labels[1] = torch.randint(0, 50, (37,))
    hidden, labels = hidden.detach().view(-1, 16).requires_grad_(), labels.view(-1)
    # 0.3 * loss: backward must scale the gradients it computed in forward.
    loss = 0.3 * linear_cross_entropy(hidden, weight, labels, chunk_size=10)  # 74 tokens: 10 does not divide
    ref = 0.3 * naive_lm(hidden, weight, labels)
    close(loss, ref, torch.float32)
    for g, rg in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        close(g, rg, torch.float32)


def test_lm_backward_twice_with_retain_graph_accumulates():
    """backward hands its saved gradients over when grad_output is 1; they must not alias .grad."""
    hidden, weight, labels = lm_batch(*SHAPES[1])
    loss = linear_cross_entropy(hidden, weight, labels.int(), chunk_size=9)  # int32 labels are fine too
    loss.backward(retain_graph=True)
    loss.backward()
    ref_grads = torch.autograd.grad(naive_lm(hidden, weight, labels), (hidden, weight))
    close(hidden.grad, 2 * ref_grads[0], torch.float32)
    close(weight.grad, 2 * ref_grads[1], torch.float32)


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_lm_one_input_without_grad(frozen):
    hidden, weight, labels = lm_batch(*SHAPES[1])
    if frozen == "hidden":
        hidden = hidden.detach()
    else:
        weight = weight.detach()
    trainable = [x for x in (hidden, weight) if x.requires_grad]
    (g,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, chunk_size=5), trainable)
    (rg,) = torch.autograd.grad(naive_lm(hidden, weight, labels), trainable)
    close(g, rg, torch.float32)
    with torch.no_grad():
        close(linear_cross_entropy(hidden, weight, labels), naive_lm(hidden, weight, labels), torch.float32)


def test_lm_all_ignored_is_zero_with_zero_grads():
    hidden, weight, labels = lm_batch(2, 5, 8, 11)
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0  # F.cross_entropy would give NaN here
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert not grad_hidden.any() and not grad_weight.any()


def test_lm_gradcheck():
    hidden, weight, labels = lm_batch(2, 3, 4, 5, seed=1)
    labels[0, 0], labels[1] = 2, torch.tensor([-100, 4, 0])
    hidden, weight = (x.detach().double().requires_grad_() for x in (hidden, weight))
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=2), (hidden, weight))


def test_lm_errors_say_what_to_do():
    hidden, weight, labels = lm_batch(2, 5, 8, 11)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match=r"weight must be \[vocab, hidden=8\]"):
        linear_cross_entropy(hidden, weight.T, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
        linear_cross_entropy(hidden, weight, labels.clamp(min=0) + 11)
    with pytest.raises(TypeError, match="cast one"):
        linear_cross_entropy(hidden, weight.double(), labels)


def test_lm_under_torch_compile():
    hidden, weight, labels = lm_batch(*SHAPES[0])

    def step(h, w, y):  # compiled code around the loss, like a model's final norm
        return 0.5 * linear_cross_entropy(torch.tanh(h), w, y, chunk_size=16)

    loss = torch.compile(step)(hidden, weight, labels)
    ref = 0.5 * naive_lm(torch.tanh(hidden), weight, labels)
    close(loss, ref, torch.float32)
    for g, rg in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        close(g, rg, torch.float32)
