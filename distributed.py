"""distributed.py -- several processes (DDP, FSDP2) and checkpoints; the one module that touches torch.distributed.

A run under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) is set up by setup_distributed; a plain
`python` run is one process and never initialises torch.distributed. shard() wraps a RewardModel with FSDP2
(fully_shard per transformer layer and the root), data_parallel() with DDP. Checkpoints are safetensors written to
a temporary folder, fsynced and swapped in, the previous copy kept beside: a kill or a power cut at any point
leaves a whole copy, and checkpoint_dir finds the newest one; under FSDP the shards are gathered (full_state) so
that the files are the same as a single process writes.
"""
from __future__ import annotations

import json
import os
import random

import torch
import torch.distributed as dist

import files
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
    for layer in [*model.lm.model.layers, *(model.reference.model.layers if model.likelihood else [])]:
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
    """Everything --resume needs: weights, AdamW moments, RNG and data position. Written to path.tmp, fsynced, then
    swapped in; the copy it replaces is kept as path.old (a damaged newest copy falls back to it). Under FSDP,
    full = full_state(model, optimizer), gathered by every process; the files are the same either way."""
    from safetensors.torch import save_file, save_model
    tmp, old = path + ".tmp", path + ".old"
    files.remove(tmp)  # a save killed half-way: start clean (a file of that name too)
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
    with open(os.path.join(tmp, "state.json"), "w") as f:  # last: without it a copy is not whole
        json.dump({**state, "param_groups": opt["param_groups"], "rng_python": random.getstate()}, f)
    files.fsync_tree(tmp)  # on the disk before the renames: a power cut cannot leave a renamed, empty copy
    # Every kill point leaves a whole copy that checkpoint_dir finds: path, or (between the renames) tmp or old.
    if os.path.lexists(path):
        if checkpoint_problem(path) is None:
            files.remove(old)  # the copy before the last one
            os.replace(path, old)
        else:  # damaged (a crash of the machine): old stays the fallback
            files.remove(path)
    files.replace(tmp, path)


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")


def safetensors_problem(path):
    """What is wrong with a .safetensors file's structure (missing, truncated, not one), or None; reads its header
    only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"truncated ({size} bytes; its header alone is {8 + n})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "not a safetensors file (its header does not parse)"
    if size != 8 + n + end:
        return f"truncated ({size} of {8 + n + end} bytes)"
    return None


def checkpoint_problem(folder):
    """Why the checkpoint copy in `folder` is not whole (one line), or None."""
    if not os.path.isdir(folder):
        return "missing" if not os.path.lexists(folder) else "not a folder"
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        if not isinstance(state.get("step"), int) or "param_groups" not in state or "rng_python" not in state:
            return "state.json lacks step, param_groups or rng_python"
    except FileNotFoundError:
        return "no state.json (a save cut short)"
    except (OSError, ValueError, AttributeError):
        return "state.json is damaged (not a whole JSON object)"
    for name in CHECKPOINT_FILES:
        problem = safetensors_problem(os.path.join(folder, name))
        if problem:
            return f"{name} is {problem}" if problem != "missing" else f"no {name}"
    return None


def _step(folder):
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)["step"]


def checkpoint_copies(path):
    """{copy: its problem or None} for the copies save_checkpoint may leave: path, path.tmp, path.old."""
    return {c: checkpoint_problem(c) for c in (path, path + ".tmp", path + ".old")}


def checkpoint_dir(path, copies=None):
    """The folder --resume loads: of the whole copies (path, path.tmp, path.old) the one at the latest step (path
    first on a tie); None if none is whole. Reads only, so every process may call it."""
    copies = checkpoint_copies(path) if copies is None else copies
    whole = [c for c, problem in copies.items() if problem is None]
    return max(whole, key=lambda c: (_step(c), -whole.index(c))) if whole else None


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
    with files.atomic_file(path) as f:
        f.writelines(kept)


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
