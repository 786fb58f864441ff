"""Issue 10, section 4: every kill point of save_checkpoint's temp-dir/swap/remove sequence is recoverable, and a
resumed run's log.jsonl has each step once. Issue 21: the files and folders are fsynced around the renames, a
damaged newest copy (a crash of the machine) falls back to the older whole one, a file named ckpt.tmp does not break
a save; one train at a time per --out, none into an earlier run without --resume, and --resume in a moved folder."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import distributed
import train
from conftest import (ROOT, easy_rows, log_losses, record_fsyncs, synced_around, train_cfg, train_tiny,
                      write_jsonl)
from formats import UsageError


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
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt.old"] and distributed.checkpoint_dir(ckpt) == ckpt
    assert distributed.checkpoint_problem(ckpt + ".old") is None  # the previous whole copy, kept as the fallback


def test_no_whole_copy_is_no_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model, optimizer = model_and_optimizer(0)
    distributed.save_checkpoint(ckpt, model, optimizer, {"step": 3})
    killed_while_writing_tmp(ckpt)
    shutil.rmtree(ckpt)
    assert distributed.checkpoint_dir(ckpt) is None


@pytest.mark.slow
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
    assert sorted(x for x in os.listdir(cfg.out) if x.startswith("ckpt")) == ["ckpt", "ckpt.old"]


def two_saves(tmp_path):
    """ckpt at step 4 (weights of seed 1), ckpt.old at step 3 (seed 0) -> (ckpt, the step-3 model)."""
    ckpt = str(tmp_path / "ckpt")
    older, older_opt = model_and_optimizer(0)
    distributed.save_checkpoint(ckpt, older, older_opt, {"step": 3})
    distributed.save_checkpoint(ckpt, *model_and_optimizer(1), {"step": 4})
    return ckpt, older


def half_a_state_json(ckpt):
    path = os.path.join(ckpt, "state.json")
    data = open(path).read()
    with open(path, "w") as f:
        f.write(data[:len(data) // 2])


def cut(name, keep):
    def damage(ckpt):
        path = os.path.join(ckpt, name)
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) * keep))
    damage.__name__ = f"{name}_cut_to_{keep}"
    return damage


@pytest.mark.parametrize("damage", [half_a_state_json, cut("model.safetensors", 0.5), cut("model.safetensors", 0),
                                    cut("optimizer.safetensors", 0.9), cut("model.safetensors", 0.001)])
def test_a_damaged_newest_copy_falls_back_to_the_older_whole_one(tmp_path, damage):
    ckpt, older = two_saves(tmp_path)
    damage(ckpt)  # a crash of the machine: the renamed files came back partial
    assert distributed.checkpoint_problem(ckpt) is not None
    assert distributed.checkpoint_dir(ckpt) == ckpt + ".old"
    restored, restored_opt = model_and_optimizer(2)
    assert distributed.load_checkpoint(ckpt + ".old", restored, restored_opt)["step"] == 3
    for a, b in zip(older.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    distributed.save_checkpoint(ckpt, restored, restored_opt, {"step": 5})  # the damaged copy goes, the whole stays
    assert distributed.checkpoint_problem(ckpt + ".old") is None and distributed.checkpoint_dir(ckpt) == ckpt


@pytest.mark.slow
def test_a_file_named_ckpt_tmp_does_not_break_the_first_save(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt.tmp").write_text("not a folder")  # used to fail: FileExistsError in os.makedirs
    distributed.save_checkpoint(ckpt, *model_and_optimizer(0), {"step": 1})
    assert distributed.checkpoint_dir(ckpt) == ckpt and sorted(os.listdir(tmp_path)) == ["ckpt"]
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(8))
    cfg = train_cfg(tmp_path / "run", data, max_steps=1, batch_size=4, max_len=64)
    os.makedirs(cfg.out)
    open(os.path.join(cfg.out, "ckpt.tmp"), "w").close()  # in a fresh --out: no earlier run, and the save works
    train_tiny(cfg)
    assert distributed.checkpoint_dir(os.path.join(cfg.out, "ckpt")) == os.path.join(cfg.out, "ckpt")


def test_save_checkpoint_fsyncs_the_files_and_folders_around_the_renames(tmp_path, monkeypatch):
    events = record_fsyncs(monkeypatch)
    ckpt = str(tmp_path / "ckpt")
    distributed.save_checkpoint(ckpt, *model_and_optimizer(0), {"step": 1})
    tmp = ckpt + ".tmp"
    before, after = synced_around(events, tmp, ckpt)
    assert {os.path.join(tmp, n) for n in ("model.safetensors", "optimizer.safetensors", "state.json")} | {tmp} <= before
    assert str(tmp_path) in after  # the folder that holds the renamed copy


@pytest.mark.slow
def test_resume_from_a_damaged_newest_checkpoint_warns_and_continues_from_the_older_copy(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=5, epochs=3, batch_size=4, max_len=64, save_interval=1)
    train_tiny(cfg, stop_after=3)  # ckpt: step 3, ckpt.old: step 2
    cut("model.safetensors", 0.5)(os.path.join(cfg.out, "ckpt"))
    capsys.readouterr()
    train_tiny(train.TrainConfig(**{**vars(cfg), "resume": True}))
    out = capsys.readouterr().out
    assert "warning: checkpoint" in out and "model.safetensors is truncated" in out
    assert f"resumed from {os.path.join(cfg.out, 'ckpt.old')} at step 2" in out
    assert [s for s, *_ in log_losses(cfg.out)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_no_whole_copy_is_an_error_that_names_the_damage(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=5, epochs=3, batch_size=4, max_len=64)
    train_tiny(cfg, stop_after=2)
    half_a_state_json(os.path.join(cfg.out, "ckpt"))
    with pytest.raises(UsageError) as e:
        train_tiny(train.TrainConfig(**{**vars(cfg), "resume": True}))
    message = str(e.value)
    assert "no whole checkpoint" in message and "state.json is damaged" in message and "\n" not in message


PAUSED_TRAIN = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import train
from demo import tiny_lm
def wait_for_go(step, numbers):  # the run holds its --out until the test says go
    while not os.path.exists({go!r}):
        time.sleep(0.01)
train.train(train.TrainConfig(**json.loads(sys.argv[1])), on_step=wait_for_go, backbone=tiny_lm.load_tiny)
"""


@pytest.mark.slow
def test_a_second_train_on_one_out_is_refused_while_the_first_goes_on(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=3, batch_size=4, max_len=64)
    go = str(tmp_path / "go")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN.format(root=ROOT, go=go), json.dumps(vars(cfg))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = os.path.join(cfg.out, "rmd.lock")
    try:
        while first.poll() is None and not (os.path.exists(lock) and f'"pid": {first.pid}' in open(lock).read()):
            time.sleep(0.01)
        with pytest.raises(ValueError) as e:  # files.FolderBusy; `rmd.py train` says it as one `error:` line
            train_tiny(cfg)
        assert first.poll() is None  # refused while the first is at work
        assert str(e.value).startswith(f"{cfg.out} is in use by another run (PID {first.pid}, rmd train started")
        open(go, "w").close()
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, output[-2000:]
    assert [s for s, *_ in log_losses(cfg.out)] == [1, 2, 3]  # one history, the first's


@pytest.mark.slow
def test_train_without_resume_refuses_a_folder_with_an_earlier_run(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=3, batch_size=4, max_len=64)
    train_tiny(cfg, stop_after=2)
    log = open(os.path.join(cfg.out, "log.jsonl")).read()
    with pytest.raises(UsageError) as e:  # used to append a second history to log.jsonl
        train_tiny(cfg)
    message = str(e.value)
    assert message.startswith(f"{cfg.out} holds an earlier run (log.jsonl with 2 records and checkpoint ckpt)")
    assert "--resume" in message and "fresh --out" in message and "\n" not in message
    assert open(os.path.join(cfg.out, "log.jsonl")).read() == log
    train_tiny(train.TrainConfig(**{**vars(cfg), "resume": True}))
    assert [s for s, *_ in log_losses(cfg.out)] == [1, 2, 3]


@pytest.mark.slow
def test_resume_continues_a_run_folder_that_was_moved(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=4, batch_size=4, max_len=64)
    train_tiny(cfg, stop_after=2)
    moved = str(tmp_path / "elsewhere")
    shutil.move(cfg.out, moved)  # used to stop: "--resume with a config that differs ... --out"
    train_tiny(train.TrainConfig(**{**vars(cfg), "out": moved, "resume": True}))
    assert [s for s, *_ in log_losses(moved)] == [1, 2, 3, 4]
    assert json.load(open(os.path.join(moved, "eval.json")))["step"] == 4
