"""Issue 10, section 4: every kill point of save_checkpoint's temp-dir/swap/remove sequence is recoverable, and a
resumed run's log.jsonl has each step once."""
import os
import shutil

import pytest
import torch

import distributed
import train
from conftest import easy_rows, log_losses, train_cfg, train_tiny, write_jsonl


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def killed_before_removing_old(ckpt):  # after both renames, before rmtree(ckpt.old)
    shutil.copytree(ckpt, ckpt + ".old")


def killed_while_removing_old(ckpt):
    os.makedirs(ckpt + ".old")
    shutil.copy(os.path.join(ckpt, "state.json"), ckpt + ".old")


def killed_between_the_renames(ckpt):  # ckpt -> ckpt.old done, ckpt.tmp -> ckpt not yet (tmp: the newer copy)
    shutil.copytree(ckpt, ckpt + ".tmp")
    os.replace(ckpt, ckpt + ".old")


def tmp_lost_between_the_renames(ckpt):  # as above, on a file system that lost the temp copy
    os.replace(ckpt, ckpt + ".old")


def killed_while_writing_tmp(ckpt):  # a partial temp copy: no state.json yet
    os.makedirs(ckpt + ".tmp")
    shutil.copy(os.path.join(ckpt, "model.safetensors"), ckpt + ".tmp")


def killed_while_writing_state(ckpt):  # the temp copy's state.json torn, ckpt.old swapped out already
    shutil.copytree(ckpt, ckpt + ".tmp")
    with open(os.path.join(ckpt + ".tmp", "state.json"), "w") as f:
        f.write('{"step": 3, "par')
    os.replace(ckpt, ckpt + ".old")


@pytest.mark.parametrize("damage", [killed_before_removing_old, killed_while_removing_old, killed_between_the_renames,
                                    tmp_lost_between_the_renames, killed_while_writing_tmp, killed_while_writing_state])
def test_every_kill_point_leaves_a_loadable_checkpoint_and_the_next_save_works(tmp_path, damage):
    ckpt = str(tmp_path / "ckpt")
    model, optimizer = model_and_optimizer(0)
    distributed.save_checkpoint(ckpt, model, optimizer, {"step": 3})
    damage(ckpt)
    found = distributed.checkpoint_dir(ckpt)
    assert found is not None
    restored, restored_opt = model_and_optimizer(1)
    assert distributed.load_checkpoint(found, restored, restored_opt)["step"] == 3
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[a]["exp_avg"], restored_opt.state[b]["exp_avg"], rtol=0, atol=0)
    # used to fail: [Errno 39] Directory not empty
    distributed.save_checkpoint(ckpt, restored, restored_opt, {"step": 4})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and distributed.checkpoint_dir(ckpt) == ckpt


def test_no_whole_copy_is_no_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model, optimizer = model_and_optimizer(0)
    distributed.save_checkpoint(ckpt, model, optimizer, {"step": 3})
    killed_while_writing_tmp(ckpt)
    shutil.rmtree(ckpt)
    assert distributed.checkpoint_dir(ckpt) is None


def test_resume_after_a_kill_between_the_renames_logs_each_step_once(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=5, lm_weight=0.5, epochs=3, batch_size=4, max_len=64)
    train_tiny(cfg, stop_after=2)
    ckpt = os.path.join(cfg.out, "ckpt")
    os.replace(ckpt, ckpt + ".old")  # killed between the renames: no ckpt/ (used to say "no checkpoint")
    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:  # steps 3-4 logged, then killed before a save
        f.write('{"step": 3, "pair_loss": 9.0, "lm_loss": 9.0}\n{"step": 4, "pair_loss": 9.0, "lm_loss": 9.0}\n{"st')
    train_tiny(train.TrainConfig(**{**vars(cfg), "resume": True}))
    steps = [s for s, *_ in log_losses(cfg.out)]
    assert steps == [1, 2, 3, 4, 5] and 9.0 not in [p for _, p, _ in log_losses(cfg.out)]
    assert sorted(x for x in os.listdir(cfg.out) if x.startswith("ckpt")) == ["ckpt"]
