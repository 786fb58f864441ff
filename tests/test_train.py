"""train.py: training learns and saves a loadable model, progress, evaluation-only runs, resume (same losses; a
changed config refused), config checks, the demo's students only through a loader."""
import json
import os

import pytest
import torch

import batches
import cli
import distributed
import loss
import train
from demo import tiny_lm
from formats import UsageError
from conftest import (chatml_tokenizer, easy_rows, log_losses, one_line_error, tiny_model, train_cfg, train_tiny,
                      write_jsonl)
from model import CutCounts, load_reward_model


@pytest.mark.slow
def test_train_shows_progress_with_elapsed_time_and_eta_from_the_first_step(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(24))
    train_tiny(train_cfg(tmp_path, data, max_steps=4, log_interval=2, lm_weight=0.0, loss="bt"))
    out, err = capsys.readouterr()
    first = [line for line in err.splitlines() if line.startswith("[train]")]
    assert len(first) == 1 and first[0].startswith("[train] 1/4 (25%) ") and "elapsed, ETA" in first[0]
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/4", "4/4"]
    assert all(" elapsed, ETA " in s for s in steps) and steps[-1].endswith("ETA 0:00")


@pytest.mark.slow
def test_training_learns_an_easy_preference_and_saves_a_loadable_model(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(160))
    test = write_jsonl(tmp_path / "test.jsonl", easy_rows(40, seed=1))
    cfg = train_cfg(tmp_path, data, eval_data=f"test={test}", max_steps=12, lm_weight=0.1, loss="bt-margin",
                    holdout=20)
    metrics = train_tiny(cfg)
    assert metrics["test"] > 0.9 and metrics["heldout"] > 0.9
    saved = json.load(open(os.path.join(cfg.out, "eval.json")))
    assert saved["accuracy"] == metrics and saved["step"] == 12
    assert saved["eval_pairs"] == {"test": 40, "heldout": 20}
    assert set(saved["margin_fit"]) == {"test", "heldout"} and saved["margin_fit"]["test"]["pairs"] == 40
    assert saved["train_data"]["cuts"]["teacher"]["sequences"] == 140  # the 160 rows less the 20 held out
    assert saved["eval_data"]["heldout"]["cuts"] == {"reward": dict(vars(CutCounts()), sequences=40, whole=40)}
    losses = log_losses(cfg.out)
    assert losses[-1][1] < losses[0][1] and losses[-1][2] < losses[0][2]
    # the saved folder reproduces the rewards of the trained model
    model = load_reward_model(os.path.join(cfg.out, "model"))
    rows = easy_rows(4, seed=2)
    rewards = model.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    trained = tiny_model(likelihood=cfg.likelihood)  # the recipe's reward model: the likelihood term too
    distributed.load_checkpoint(os.path.join(cfg.out, "ckpt"), trained,
                                train.build_optimizer(trained, cfg, 1e-3, cuda=False, sharded=False))
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "s.jsonl", rows), trained.tokenizer, 128)
    with torch.no_grad():
        direct, _ = trained.eval()(batches.collate(examples, trained.pad_id, False, False))
    torch.testing.assert_close(torch.tensor(rewards), direct[:4], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_max_steps_zero_evaluates_the_untrained_model_only(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(12))
    rows = easy_rows(6, seed=1)
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    nomargin = write_jsonl(tmp_path / "nm.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    cfg = train_cfg(tmp_path, data, eval_data=f"test={test},plain={nomargin}", max_steps=0, lm_weight=0.0,
                    batch_size=16)  # fewer pairs than one batch is fine when nothing is trained
    metrics = train_tiny(cfg)
    out = capsys.readouterr().out
    assert "evaluating only" in out and "final eval: test" in out and "margin fit: pearson" in out
    saved = json.load(open(os.path.join(cfg.out, "eval.json")))
    assert saved["step"] == 0 and saved["accuracy"] == metrics and set(metrics) == {"test", "plain"}
    assert set(saved["margin_fit"]) == {"test"}  # only splits whose pairs have margins
    assert set(saved["train_data"]["cuts"]) == {"reward"}  # --lm-weight=0: teacher answers are not used
    log_path = os.path.join(cfg.out, "log.jsonl")
    assert not os.path.exists(log_path) or not open(log_path).read()  # no training step
    # the step-0 numbers are the saved (untrained) model's: margin fit by hand from its rewards
    model = load_reward_model(os.path.join(cfg.out, "model"))
    chosen = model.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = model.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    dr = [c - r for c, r in zip(chosen, rejected)]
    ds = [r["chosen_score"] - r["rejected_score"] for r in rows]
    mr, ms = sum(dr) / 6, sum(ds) / 6
    pearson = sum((a - mr) * (b - ms) for a, b in zip(dr, ds)) / (
        sum((a - mr) ** 2 for a in dr) * sum((b - ms) ** 2 for b in ds)) ** 0.5
    fit = saved["margin_fit"]["test"]
    assert fit["pearson"] == pytest.approx(pearson, abs=1e-4)
    assert fit["mse"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(dr, ds)) / 6, rel=1e-4)
    assert metrics["test"] == sum(d > 0 for d in dr) / 6
    assert train.TrainConfig().max_steps == -1  # the default runs the epochs


@pytest.mark.slow
def test_cut_backbone_with_lm_term_warns(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = chatml_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    folder = str(tmp_path / "backbone")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(8))
    train.train(train_cfg(tmp_path, data, model=folder, layers=1, lm_weight=0.1, max_steps=0))
    assert "warning: --layers=1 cuts the backbone and --lm-weight=0.1 > 0" in capsys.readouterr().out
    train.train(train_cfg(tmp_path, data, model=folder, layers=1, lm_weight=0.0, max_steps=0))
    assert "warning: --layers" not in capsys.readouterr().out


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(48))
    straight = train_cfg(tmp_path / "a", data, max_steps=8, lm_weight=0.5, epochs=3)
    train_tiny(straight)
    first = train_cfg(tmp_path / "b", data, max_steps=8, lm_weight=0.5, epochs=3)
    train_tiny(train.TrainConfig(**{**vars(first), "max_steps": 8}), stop_after=3)
    train_tiny(train.TrainConfig(**{**vars(first), "resume": True}))
    a, b = log_losses(straight.out), log_losses(first.out)
    assert [s for s, *_ in b] == list(range(1, 9))
    for (step_a, pair_a, lm_a), (step_b, pair_b, lm_b) in zip(a, b):
        assert step_a == step_b and abs(pair_a - pair_b) < 1e-6 and abs(lm_a - lm_b) < 1e-6


@pytest.mark.slow
def test_the_likelihood_weight_learns_at_its_own_rate_and_resumes(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(48))
    straight = train_cfg(tmp_path / "a", data, max_steps=8, lr=1e-5, likelihood=True, warmup=0)
    train_tiny(straight)
    first = train_cfg(tmp_path / "b", data, max_steps=8, lr=1e-5, likelihood=True, warmup=0)
    train_tiny(first, stop_after=3)
    train_tiny(train.TrainConfig(**{**vars(first), "resume": True}))
    read = lambda out: [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]  # noqa: E731
    a, b = read(straight.out), read(first.out)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert abs(ra["pair_loss"] - rb["pair_loss"]) < 1e-6 and ra["likelihood_weight"] == rb["likelihood_weight"]
    # Adam moves the weight ~its rate per step: train.LIKELIHOOD_LR, not --lr=1e-5
    assert abs(a[0]["likelihood_weight"]) > 0.5 * train.LIKELIHOOD_LR
    assert load_reward_model(os.path.join(straight.out, "model")).likelihood_weight.item() == \
        pytest.approx(a[-1]["likelihood_weight"])


def test_one_list_of_loss_kinds_for_the_check_and_the_help(tmp_path):
    """--loss is checked against loss.PAIRWISE_KINDS, and --help names every kind in it."""
    help_text = cli.field_comments(train.TrainConfig)["loss"]
    assert all(kind in help_text for kind in loss.PAIRWISE_KINDS)
    data = write_jsonl(tmp_path / "d.jsonl", easy_rows(2))
    with pytest.raises(UsageError, match="--loss must be one of " + ", ".join(loss.PAIRWISE_KINDS)):
        train.validate(train.TrainConfig(data=data, loss="hinge"))


@pytest.mark.slow
def test_resume_with_a_different_config_stops_before_writing(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", easy_rows(8))
    cfg = train_cfg(tmp_path / "r", data, max_steps=2, batch_size=4)
    train_tiny(cfg, stop_after=1)
    saved = open(os.path.join(cfg.out, "config.json")).read()
    changed = train.TrainConfig(**{**vars(cfg), "resume": True, "lr": 0.5, "seed": 7, "log_interval": 3})
    with pytest.raises(UsageError) as e:
        train_tiny(changed)
    message = str(e.value)
    assert message.startswith("--resume with a config that differs") and "--lr " in message
    assert "--seed 3 -> 7" in message and "log-interval" not in message and "\n" not in message
    assert open(os.path.join(cfg.out, "config.json")).read() == saved  # nothing overwritten
    train_tiny(train.TrainConfig(**{**vars(cfg), "resume": True, "log_interval": 3}))  # watching differently is fine


@pytest.mark.slow
def test_the_demos_students_load_through_rmd_py_or_a_loader_not_by_name_in_the_library(tmp_path):
    """'tiny' and 'tiny-scratch' are the demo's (demo/tiny_lm.py): the library does not know them by name. From
    Python, train.train(cfg) says how to get them; train.train(cfg, backbone=load_tiny) trains one."""
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(8))
    message = one_line_error(["train", f"--data={data}", "--model=nano", f"--out={tmp_path / 'x'}"])
    assert "--model=nano: no such folder or file" in message
    with pytest.raises(UsageError, match="'tiny' and 'tiny-scratch' are the demo's students: `python rmd.py train "
                                         r"--model=tiny`, or in Python train.train\(cfg, backbone=demo.tiny_lm"):
        train.train(train_cfg(tmp_path, data, model="tiny", max_steps=0))
    assert train.train(train_cfg(tmp_path, data, max_steps=0), backbone=tiny_lm.load_tiny).keys() == set()
