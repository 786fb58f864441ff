"""distributed.py -- several processes (DDP, FSDP2) and checkpoints; the one module that touches torch.distributed.

A run under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) is set up by setup_distributed; a plain
`python` run is one process and never initialises torch.distributed. shard() wraps a RewardModel with FSDP2
(fully_shard per transformer layer and the root), data_parallel() with DDP. Checkpoints are safetensors written to
a temporary folder and swapped in, so a kill at any point leaves a whole copy; under FSDP the shards are gathered
(full_state) so that the files are the same as a single process writes.
"""
from __future__ import annotations

import json
import os
import random

import torch
import torch.distributed as dist

from model import pick_device


def setup_distributed(device="auto"):
    """DDP from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) -> (rank, world size, device);
    a single process otherwise."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, pick_device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    return rank, world, device


def shard(model, bf16):
    """FSDP2: each transformer layer and the root (embeddings, LM head, value head) sharded over the processes.
    Call before the optimizer is built: fully_shard swaps each parameter for this process's DTensor shard.
    bf16: bf16 weights in the forward, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.lm.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def data_parallel(model, device, cuda, find_unused_parameters):
    """DDP: every process holds the whole model; gradients are averaged in backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device] if cuda else None, find_unused_parameters=find_unused_parameters)


def all_reduce_sum(tensor):
    """Sum `tensor` over the processes, in place (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def finish():
    """Leave the process group (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
