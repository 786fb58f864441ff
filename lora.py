"""LoRA for `rmd.py train --lora-r=N`, through the optional `peft` package (imported only here, only when asked).

    import lora
    lora.add_adapters(reward_model, r=16, alpha=32, dropout=0.0)   # before the optimizer is built
    ...train...
    lora.merge_adapters(reward_model)                               # before saving: a plain model again

Adapters go on every linear layer of the backbone (attention and MLP projections); the backbone's other weights are
frozen. The value head and the LM head are trained fully (a tied LM head trains the input embeddings with it).
The model is saved merged (W + alpha/r · B·A folded into W), so every loader (load_reward_model, eval, bon, serve,
the sequence-classification export) reads a plain transformers model, with no peft needed to load it.
"""
from __future__ import annotations

import torch.nn as nn

from formats import UsageError


def backbone_linear_names(backbone):
    """Names (last component) of the backbone's nn.Linear layers, e.g. q_proj, k_proj, ..., down_proj."""
    return sorted({name.rpartition(".")[2] for name, module in backbone.named_modules()
                   if isinstance(module, nn.Linear)})


def add_adapters(model, r, alpha, dropout):
    """Freeze model.lm's backbone and give its linear layers LoRA adapters of rank r, in place; the LM head and
    value head stay trainable. Returns (trainable, total) parameter counts."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("--lora-r needs the peft package: pip install peft (or --lora-r=0 for a full "
                         "fine-tune)") from None
    if r < 0 or alpha <= 0 or not 0 <= dropout < 1:
        raise UsageError(f"need --lora-r >= 0, --lora-alpha > 0 and 0 <= --lora-dropout < 1 "
                         f"(got {r}, {alpha}, {dropout})")
    backbone = model.lm.model
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=backbone_linear_names(backbone))
    inject_adapter_in_model(config, backbone)  # in place; marks only the adapters of the backbone trainable
    model.lm.get_output_embeddings().weight.requires_grad_(True)
    for p in model.value_head.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_adapters(model):
    """Fold every adapter into its base layer and put the plain layer back, in place: model.lm is a plain
    transformers model again (same parameter names as before add_adapters)."""
    from peft.tuners.lora import LoraLayer
    backbone = model.lm.model
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in backbone.__dict__:
            delattr(backbone, attr)
    for p in model.parameters():
        p.requires_grad_(True)
