"""The two losses of RM-Distiller's student, fused and checked against plain PyTorch.

    L = pairwise_loss(chosen_rewards, rejected_rewards, margins, kind) + lm_weight * linear_cross_entropy(...)

pairwise_loss(chosen_rewards, rejected_rewards, margins=None, kind="mse")
    Per-pair preference loss, mean over pairs; Δr = chosen_rewards - rejected_rewards, Δs = margins
    (the teacher's score gap s(y_w*) - s(y_l)):
      "mse"        (Δr - Δs)²          the paper's margin-aware regression (default)
      "bt-margin"  -log σ(Δr - Δs)     Llama-2 style Bradley-Terry with margin
      "bt"         -log σ(Δr)          plain Bradley-Terry; margins must be None
linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None)
    Same value and gradients as F.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index),
    but the LM head and the loss run chunk by chunk over tokens, so the [tokens, vocab] logits never
    exist at once. hidden [..., H], weight [V, H] (the LM head), labels [...] already shifted.

Both are torch.autograd.Functions whose gradients are computed in the forward pass and only scaled
in backward. Only torch is needed: copy this file into your code. Tests: tests/test_loss.py.
Precision: the math runs in fp32 (fp64 if an input is fp64); both losses are returned in that dtype
(a scalar costs nothing, and a bf16 loss would keep ~3 digits), gradients come back in each input's dtype.
"""
import torch
import torch.nn.functional as F

PAIRWISE_KINDS = ("mse", "bt-margin", "bt")
# What each kind needs from the data, declared here once (train.py and batches.py read it; a new kind is added here):
NEEDS_MARGINS = ("mse", "bt-margin")  # a preference strength Δs per pair; "bt" refuses margins
LEARNS_TIES = ("mse",)  # a margin-0 pair ("equally good"): (Δr - 0)² pulls Δr to 0; -log σ(Δr) would pick a side


# ----------------------------------------------------------------------------- pairwise loss

def _check_pairwise(chosen_rewards, rejected_rewards, margins, kind):
    if kind not in PAIRWISE_KINDS:
        raise ValueError(f"pairwise_loss: kind={kind!r} is not one of {PAIRWISE_KINDS}")
    named = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    if kind not in NEEDS_MARGINS:
        # Silently ignoring margins would hide a mix-up between "bt" and "bt-margin".
        if margins is not None:
            raise ValueError("pairwise_loss: kind='bt' does not use margins; pass margins=None, "
                             "or kind='bt-margin' / 'mse' to use them")
    elif margins is None:
        raise ValueError(f"pairwise_loss: kind={kind!r} needs margins (Δs = chosen_score - rejected_score, "
                         "one per pair); use kind='bt' to train without them")
    else:
        named["margins"] = margins
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pairwise_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    # Never broadcast: [B] against [B, 1] would compare every pair with every margin, which pulls
    # each pair towards the batch-mean margin instead of its own (the official code's bug).
    if len(set(shapes.values())) != 1:
        raise ValueError(f"pairwise_loss: shapes must be identical, one value per pair (e.g. all [B]); "
                         f"got {shapes}. Reshape with .view(-1) rather than relying on broadcasting")
    if chosen_rewards.numel() == 0:
        raise ValueError("pairwise_loss: got zero pairs")
    for name in ("chosen_rewards", "rejected_rewards"):
        if not named[name].is_floating_point():
            raise TypeError(f"pairwise_loss: {name} must be a floating-point tensor, got {named[name].dtype}")


class _PairwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen_rewards, rejected_rewards, margins, kind):
        dtype = torch.promote_types(torch.promote_types(chosen_rewards.dtype, rejected_rewards.dtype), torch.float32)
        z = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)  # Δr
        if margins is not None:
            z = z - margins.to(device=z.device, dtype=dtype)  # Δr - Δs
        n = z.numel()
        if kind == "mse":
            loss = z.square().mean()
            grad_z = z * (2.0 / n)
        else:
            # -log σ(z) = softplus(-z) and d/dz = -σ(-z): both stay finite for any |z|.
            loss = F.softplus(-z).mean()
            grad_z = torch.sigmoid(-z) * (-1.0 / n)
        ctx.save_for_backward(grad_z)  # the only thing backward needs
        ctx.dtypes = (chosen_rewards.dtype, rejected_rewards.dtype,
                      margins.dtype if margins is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_z,) = ctx.saved_tensors
        g = grad_z * grad_loss
        chosen_dtype, rejected_dtype, margins_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        grad_chosen = g.to(chosen_dtype) if need[0] else None
        grad_rejected = (-g).to(rejected_dtype) if need[1] else None
        grad_margins = (-g).to(margins_dtype) if need[2] else None
        return grad_chosen, grad_rejected, grad_margins, None


def pairwise_loss(chosen_rewards, rejected_rewards, margins=None, kind="mse"):
    """Mean per-pair loss; see the module docstring. All inputs must have the same shape, e.g. [B].

    margins may be any numeric dtype (integer teacher scores are fine); if it requires grad it gets one.
    """
    _check_pairwise(chosen_rewards, rejected_rewards, margins, kind)
    return _PairwiseLoss.apply(chosen_rewards, rejected_rewards, margins, kind)


# ----------------------------------------------------------------------------- LM loss

def _default_chunk_size(vocab_size, budget=2**25):
    # A chunk's fp32 logits hold about `budget` elements (128 MiB): a fixed cost next to the [V, H]
    # grad buffer. Liger's rule (chunk ≈ N / ceil(V / H)) gives 32-64 tokens here, which measured
    # 1.5x slower than naive on CPU (python -m tools.bench --only lm --chunk-size 64); 256-1024 ran at 0.9-1.06x.
    return 1 << max(budget // vocab_size, 1).bit_length() - 1


def _check_lm(hidden, weight, labels):
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} "
                         f"plus a hidden dimension (labels already shifted by the caller)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must be [vocab, hidden={hidden.shape[-1]}] (the LM head "
                         f"weight), got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                        f"cast one so both match (as the LM head's matmul would need)")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: labels must be int64 (or int32) token ids, got {labels.dtype}")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, need_hidden_grad, need_weight_grad):
        # one fused pass (~60 lines on purpose): loss and both gradients per chunk, so no [N, V] logits tensor lives
        lead_shape, hidden_size = hidden.shape[:-1], hidden.shape[-1]
        vocab_size = weight.shape[0]
        hidden = hidden.reshape(-1, hidden_size)
        labels = labels.reshape(-1).long()  # gather wants int64
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)

        # Prompt and padding positions cost nothing: only the rows that have a target are computed.
        rows = (labels != ignore_index).nonzero().squeeze(1)
        n_valid = rows.numel()
        all_valid = n_valid == labels.numel()
        hidden_valid = hidden if all_valid else hidden.index_select(0, rows)
        labels_valid = labels if all_valid else labels.index_select(0, rows)
        if n_valid and not 0 <= int(labels_valid.min()) <= int(labels_valid.max()) < vocab_size:
            raise ValueError(f"linear_cross_entropy: labels must be in [0, {vocab_size}) or {ignore_index}")

        loss = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        grad_hidden_valid = torch.empty_like(hidden_valid) if need_hidden_grad else None
        # Summed over chunks in fp32 even for a bf16 weight, cast once at the end.
        grad_weight = (torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
                       if need_weight_grad else None)
        if chunk_size is None:
            chunk_size = _default_chunk_size(vocab_size)
        for start in range(0, n_valid, chunk_size):
            h = hidden_valid[start:start + chunk_size]
            y = labels_valid[start:start + chunk_size]
            # The matmul runs in the inputs' dtype (it accumulates in fp32 inside; bf16 uses fast kernels),
            # the softmax in fp32: same as F.cross_entropy((hidden @ weight.T).float(), labels).
            logits = (h @ weight.T).to(compute_dtype)
            target_logits = logits.gather(1, y[:, None]).squeeze(1)
            # logsumexp by hand, in place: one exp pass over [chunk, V] and no second [chunk, V] buffer;
            # the exponentials are then reused as the softmax.
            row_max = logits.amax(dim=1, keepdim=True)
            exp_logits = logits.sub_(row_max).exp_()
            sum_exp = exp_logits.sum(dim=1, keepdim=True)
            loss += (row_max + sum_exp.log()).squeeze(1).sub(target_logits).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            # d loss / d logits = (softmax - onehot) / n_valid
            grad_logits = exp_logits.div_(sum_exp * n_valid)
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0 / n_valid
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden_grad:
                grad_hidden_valid[start:start + chunk_size] = grad_logits @ weight
            if need_weight_grad:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.T, h)  # in place: no [V, H] temporary per chunk
                else:
                    grad_weight += grad_logits.T @ h

        # With nothing to predict the mean is 0/0; 0 with zero gradients lets such a batch pass harmlessly.
        loss = loss / max(n_valid, 1)
        grad_hidden = None
        if need_hidden_grad:
            if all_valid:
                grad_hidden = grad_hidden_valid
            else:
                grad_hidden = hidden.new_zeros(hidden.shape).index_copy_(0, rows, grad_hidden_valid)
            grad_hidden = grad_hidden.view(*lead_shape, hidden_size)
        if need_weight_grad:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The gradients were computed for grad_loss = 1: hand them over as they are (no second [V, H]
        # copy at the peak), or scale them, e.g. by lm_weight.
        if grad_loss.item() == 1.0:
            return grad_hidden, grad_weight, None, None, None, None, None
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


# torch.compile runs this eagerly (one graph break): the rows to compute depend on the labels' values,
# which dynamo cannot trace, and tracing around that would unroll and recompile the chunk loop per
# number of chunks. The work is in the matmuls, which compiling would not speed up.
@torch.compiler.disable
def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None):
    """F.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index) without the full logits.

    hidden [..., H], weight [V, H], labels [...] int64 (shifted by the caller). Returns the mean over
    non-ignored tokens as an fp32 scalar; 0.0 with zero gradients if every token is ignored (where
    F.cross_entropy gives NaN). chunk_size: tokens per chunk (default: about 2**25 / V, a power of two).
    """
    _check_lm(hidden, weight, labels)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    # In eval or under no_grad, skip all the gradient work.
    grad_on = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size,
                                     grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
