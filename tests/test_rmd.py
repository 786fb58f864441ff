"""rmd.py train (train.py, batches.py, model.py): data parsing, cutting, the packed reward model, the LM term,
checkpoints and resume."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import batches
import cli
import distributed
import evaluation
import formats
import loss
import rmd
import serve
import train
from demo import builtin, tiny_lm
from formats import UsageError
from conftest import (ROOT, chatml_tokenizer, easy_rows, log_losses, tiny_model, train_cfg, train_tiny,
                      write_jsonl)
from model import (CUT_KINDS, ByteTokenizer, CutCounts, answer_ids, encode, fit, load_backbone, load_reward_model,
                   prompt_floor, render_prompt)

HH = "\n\nHuman: How do I bake bread?\n\nAssistant:"


# ------------------------------------------------------------------------------------------------ data


def test_row_forms_parse_to_the_same_example(tmp_path):
    tok = ByteTokenizer()
    forms = [
        {"prompt": "How do I bake bread?", "chosen": "Knead it.", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "How do I bake bread?"}],
         "chosen": [{"role": "assistant", "content": "Knead it."}], "rejected": "No."},
        {"chosen": HH + " Knead it.", "rejected": HH + " No."},  # implicit prompt, HH-RLHF style
        {"prompt": HH, "chosen": " Knead it.", "rejected": " No."},
    ]
    examples = list(batches.load_pairs(write_jsonl(tmp_path / "forms.jsonl", forms), tok, 256)[0])
    assert len(examples) == len(forms)
    for ex in examples[1:]:
        assert ex == examples[0]
    text = tok.decode(examples[0].prompt[0] + examples[0].chosen)
    assert text == HH + " Knead it."


def test_implicit_prompt_splits_at_the_last_assistant_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me\n\nAssistant: Sure, here is how"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me\n\nAssistant: Sure, no"
    messages, c, r, margin, teacher = formats.parse_row({"chosen": chosen, "rejected": rejected}, "x:1")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert (c, r) == (" Sure, here is how", " Sure, no")


def test_margin_from_scores_or_field():
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 7.5, "rejected_score": 3}
    assert formats.parse_row(row, "x:1")[3] == 4.5
    assert formats.parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, "x:1")[3] == 2.0


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": "a"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b", "margin": 1}', "field 'prompt'"),
    ('{"prompt": "p", "chosen": 5, "rejected": "b", "margin": 1}', "field 'chosen'"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": "9", "rejected_score": 1}', "chosen_score"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}', "needs a preference strength"),
])
def test_bad_rows_stop_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1}, line])
    with pytest.raises(formats.DataError) as err:
        batches.load_pairs(path, ByteTokenizer(), 64, need_margin=True)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("need_margin", [train.TrainConfig().loss != "bt", True])  # the default loss's, and mse's
@pytest.mark.parametrize("missing", ["chosen_score", "rejected_score"])
def test_a_lone_score_is_a_missing_field_at_its_line(tmp_path, need_margin, missing):
    rows = easy_rows(5)
    del rows[3][missing]  # used to be a KeyError traceback from formats.number
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(formats.DataError) as err:
        batches.load_pairs(path, ByteTokenizer(), 64, need_margin=need_margin)
    assert str(err.value).startswith(f"{path}:4: missing field '{missing}'")


def full_ids(tok, prompt, answer):
    return (encode(tok, render_prompt(tok, formats.as_messages(prompt, "x"))), answer_ids(tok, answer))


@pytest.mark.parametrize("tokenizer", ["bytes", "chatml"])
def test_cutting_keeps_the_question_end_then_the_answer_start(tokenizer):
    tok = ByteTokenizer() if tokenizer == "bytes" else chatml_tokenizer()
    header = "\n\nAssistant:" if tokenizer == "bytes" else "<|im_start|>assistant\n"
    max_len = 128
    long_prompt, long_answer = "x " * 400 + "the question?", "good answer " * 60 + "bad end"
    cases = {  # (prompt, answer) -> cut kind
        "whole": ("the question?", "good answer"),
        "prompt_left": (long_prompt, "good answer"),
        "prompt_min": (long_prompt, long_answer),
        "answer_end": ("q?", long_answer),
    }
    for kind, (prompt_text, answer_text) in cases.items():
        prompt, answer = full_ids(tok, prompt_text, answer_text)
        p, a, cut = fit(prompt, answer, max_len)
        assert (cut or "whole") == kind
        assert len(p) + len(a) <= max_len and p == prompt[len(prompt) - len(p):]  # the prompt's end, in one piece
        assert tok.decode(p).endswith(header)
        floor = prompt_floor(len(prompt), max_len)
        assert len(p) >= floor == min(len(prompt), 32)  # at --max-len=128: the last 32 tokens of the question
        if kind in ("whole", "prompt_left"):
            assert a == answer and a[-1] == tok.eos_token_id  # a whole answer ends with its eos
        else:  # the answer's beginning, no eos: a cut answer does not pretend to be complete
            assert len(p) + len(a) == max_len and a == answer[:len(a)] and tok.eos_token_id not in a
            assert len(p) == (floor if kind == "prompt_min" else len(prompt))
        if kind == "prompt_left":
            assert len(p) + len(a) == max_len and len(p) > floor


def test_every_command_cuts_the_same_way_and_teacher_answers_keep_their_prompt(tmp_path):
    """load_pairs (train: pair_cache.tokenize_chunk) and RewardModel.tokens (eval, bon, serve) build the same
    sequences; a teacher answer over the budget keeps the prompt's floor and its own beginning, never just the
    prompt's last token."""
    model = tiny_model(max_len=64)
    tok = model.tokenizer
    row = {"prompt": "x" * 300 + " the question?", "chosen": "yes " * 40, "rejected": "no " * 40,
           "teacher_response": "The answer is " + "long " * 60}
    (ex,), _ = batches.load_pairs(write_jsonl(tmp_path / "r.jsonl", [row]), tok, 64)
    assert ex.prompt[0] + ex.chosen == model.tokens(row["prompt"], row["chosen"], 64)
    assert ex.prompt[1] + ex.rejected == model.tokens(row["prompt"], row["rejected"], 64)
    assert ex.cuts == ("prompt_min", "prompt_min", "prompt_min")
    prompt, answer = ex.teacher
    assert len(prompt) == prompt_floor(ex.prompt_len, 64) == 32 and tok.decode(prompt).endswith(
        "question?\n\nAssistant:")
    assert tok.decode(answer).startswith(" The answer is") and len(prompt) + len(answer) == 64


def test_cut_counts_add_up_and_count_only_the_rows_a_run_uses(tmp_path):
    long_prompt = "x " * 100 + "the question?"
    rows = [{"prompt": "q", "chosen": "fine", "rejected": "bad", "teacher_response": "fine too"},  # nothing cut
            {"prompt": long_prompt, "chosen": "fine", "rejected": "bad", "teacher_response": "t " * 80},
            {"prompt": long_prompt, "chosen": "a " * 80, "rejected": "b", "teacher_response": "t"},
            {"prompt": "q", "chosen": "a " * 80, "rejected": "b " * 80},  # no teacher answer
            {"prompt": "q", "chosen": "same", "rejected": "same", "teacher_response": "t " * 80}]  # dropped
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    _, stats = batches.load_pairs(path, ByteTokenizer(), 64, teacher=True)
    assert stats.rows == 5 and stats.kept == 4 and stats.dropped == {"chosen == rejected": 1}
    reward, teacher = stats.cuts["reward"], stats.cuts["teacher"]
    assert (reward.sequences, reward.whole, reward.prompt_left, reward.prompt_min, reward.answer_end) == (8, 2, 3, 1, 2)
    assert (teacher.sequences, teacher.whole, teacher.prompt_left, teacher.prompt_min) == (3, 1, 1, 1)
    for counts in (reward, teacher):
        assert counts.whole + sum(getattr(counts, k) for k in CUT_KINDS) == counts.sequences
        assert counts.most_prompt_lost <= counts.sequences
    assert reward.sequences == 2 * stats.kept and teacher.sequences <= stats.kept
    assert reward.most_prompt_lost == 4 and teacher.most_prompt_lost == 2  # the long prompt keeps < half
    _, eval_stats = batches.load_pairs(path, ByteTokenizer(), 64)  # an eval split, or --lm-weight=0
    assert set(eval_stats.cuts) == {"reward"} and eval_stats.cuts["reward"] == reward
    summary = stats.summary("train")
    assert "8 chosen/rejected sequences: 2 whole, 3 prompt cut from the left, 1 prompt cut to its floor" \
        in summary and "3 teacher-answer sequences" in summary
    warnings = batches.cut_warnings("train", stats.cuts, 64)
    assert len(warnings) == 2 and "--max-len=64" in warnings[0]
    assert "4 of 8 chosen/rejected sequences (50%)" in warnings[0] and "2 of 3 teacher-answer" in warnings[1]
    _, short = batches.load_pairs(write_jsonl(tmp_path / "s.jsonl", rows[:1] * 10 + rows[1:2]), ByteTokenizer(), 64)
    assert short.cuts["reward"].most_prompt_lost == 2 and not batches.cut_warnings("x", short.cuts, 64)  # 2 of 22


def test_over_long_rows_are_cut_and_counted(tmp_path):
    long_prompt = "x" * 300 + " the question?"
    rows = [{"prompt": long_prompt, "chosen": "good answer", "rejected": "bad"},
            {"prompt": "p", "chosen": "A " + "y" * 100, "rejected": "B " + "y" * 100},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    examples, stats = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", rows), ByteTokenizer(), 64)
    assert stats.rows == 3 and stats.kept == 2 and stats.dropped == {"chosen == rejected": 1}
    first = examples[0]
    tok = ByteTokenizer()
    for prompt, answer in ((first.prompt[0], first.chosen), (first.prompt[1], first.rejected)):
        assert len(prompt) + len(answer) <= 64
        assert answer[-1] == tok.eos_token_id
        assert tok.decode(prompt).endswith("the question?\n\nAssistant:")  # the end of the prompt survives
    second = examples[1]
    assert tok.decode(second.prompt[0] + second.chosen) == "\n\nHuman: p\n\nAssistant: A " + "y" * 39
    cuts = stats.cuts["reward"]
    assert (cuts.prompt_left, cuts.answer_end, cuts.whole) == (2, 2, 0)
    assert "dropped: chosen == rejected: 1" in stats.summary("train")


def test_rows_identical_after_cutting_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "p", "chosen": "z" * 100 + "A", "rejected": "z" * 100 + "B"}]
    with pytest.raises(formats.DataError, match="identical after cutting"):
        batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", rows), ByteTokenizer(), 32)


def test_margin_fit_matches_a_hand_computation():
    # dr = 1 2 3, ds = 1 3 2: means 2 and 2; cov = (-1)(-1) + 0 + 0 = 1; var = 2 and 2 -> r = 1/2
    # mse = (0^2 + 1^2 + 1^2) / 3 = 2/3
    fit = evaluation.margin_fit([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert fit["pairs"] == 3 and fit["pearson"] == pytest.approx(0.5) and fit["mse"] == pytest.approx(2 / 3)
    # a constant side has no correlation; mse = ((1-2)^2 + (1-5)^2) / 2 = 8.5
    assert evaluation.margin_fit([1.0, 1.0], [2.0, 5.0]) == {"pairs": 2, "pearson": None, "mse": pytest.approx(8.5)}


# ------------------------------------------------------------------------------------------------ model


def padded(sequences, pad_id, left):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_independent_of_packing_padding_side_and_batch_size(tmp_path, pad_is_eos):
    model = tiny_model().eval()
    if pad_is_eos:
        model.pad_id = model.tokenizer.eos_token_id
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", easy_rows(6)), model.tokenizer, 256)
    sequences = [ex.prompt[0] + ex.chosen for ex in examples] + [ex.prompt[1] + ex.rejected for ex in examples]
    with torch.no_grad():
        packed, _ = model(batches.collate(examples, model.pad_id, False, False))
        one_by_one = torch.cat([model.rewards(*padded([s], model.pad_id, False)) for s in sequences])
        right = model.rewards(*padded(sequences, model.pad_id, left=False))
        left = model.rewards(*padded(sequences, model.pad_id, left=True))
    for other in (packed, right, left):
        torch.testing.assert_close(other, one_by_one, atol=1e-5, rtol=1e-4)


def test_packed_lm_term_equals_full_logits_cross_entropy(tmp_path):
    model = tiny_model().eval()
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", easy_rows(5)), model.tokenizer, 256)
    batch = batches.collate(examples, model.pad_id, True, True)
    _, lm_hidden = model(batch)
    weight = model.lm.get_output_embeddings().weight
    fused = loss.linear_cross_entropy(lm_hidden, weight, batch.lm_target)
    # reference: each prompt + teacher answer on its own, full logits, prompt positions masked
    losses, count = 0.0, 0
    for ex in examples:
        prompt, answer = ex.teacher
        ids = torch.tensor([prompt + answer])
        logits = model.lm(input_ids=ids).logits[0, :-1]
        labels = torch.tensor(prompt + answer)[1:].clone()
        labels[:len(prompt) - 1] = -100
        losses = losses + F.cross_entropy(logits, labels, reduction="sum")
        count += len(answer)
    torch.testing.assert_close(fused, losses / count, atol=1e-5, rtol=1e-4)
    assert batch.n_pairs == 5 and len(batch.lm_target) == count


def test_collate_packs_with_little_padding(tmp_path):
    model = tiny_model()
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", easy_rows(32)), model.tokenizer, 256)
    batch = batches.collate(examples, model.pad_id, True, True)
    assert batch.real_tokens / batch.input_ids.numel() > 0.9
    longest = max(len(ex.prompt[0]) + len(ex.chosen) for ex in examples)
    assert longest <= batch.input_ids.shape[1] <= 2 * longest  # attention never costs more than 4x padding's


# ------------------------------------------------------------------------------------------------ training


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
    trained = tiny_model()
    distributed.load_checkpoint(os.path.join(cfg.out, "ckpt"), trained, torch.optim.AdamW(
        [{"params": [p for p in trained.parameters() if p.dim() >= 2]},
         {"params": [p for p in trained.parameters() if p.dim() < 2]}]))
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
def test_cli_without_data_says_what_to_pass(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "rmd.py"), "train"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "--data" in run.stderr and "rmd.py distill" in run.stderr
    run = subprocess.run([sys.executable, "rmd.py", "train", "--data=x.jsonl", "--lernrate=1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "unknown option --lernrate" in run.stderr


def test_overrides_are_type_checked():
    cfg = cli.parse_overrides(train.TrainConfig(), ["--lr=3e-4", "--max-steps", "5", "--resume", "--loss=bt"])
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.loss) == (3e-4, 5, True, "bt")
    with pytest.raises(UsageError, match="expected int"):
        cli.parse_overrides(train.TrainConfig(), ["--max-steps=many"])


def test_one_list_of_loss_kinds_for_the_check_and_the_help(tmp_path):
    """--loss is checked against loss.PAIRWISE_KINDS, and --help names every kind in it."""
    help_text = cli.field_comments(train.TrainConfig)["loss"]
    assert all(kind in help_text for kind in loss.PAIRWISE_KINDS)
    data = write_jsonl(tmp_path / "d.jsonl", easy_rows(2))
    with pytest.raises(UsageError, match="--loss must be one of " + ", ".join(loss.PAIRWISE_KINDS)):
        train.validate(train.TrainConfig(data=data, loss="hinge"))


def test_example_files_in_data_are_read_by_train_and_distill():
    tok = ByteTokenizer()
    for name, need_margin in (("pairs", False), ("distilled", True), ("hh_style", False)):
        examples, stats = batches.load_pairs(os.path.join(ROOT, "data", f"{name}.jsonl"), tok, 512, need_margin)
        assert stats.kept == stats.rows > 0
    kinds = {name: {r["kind"] for r in formats.load_distill_rows(os.path.join(ROOT, "data", f"{name}.jsonl"))}
             for name in ("pairs", "pools", "prompts", "hh_style")}
    assert kinds == {"pairs": {"pair"}, "pools": {"pool"}, "prompts": {"prompt"}, "hh_style": {"pair"}}


@pytest.mark.slow
def test_demo_commands_run_on_the_embedded_default(tmp_path):
    """README's main job, shortened: distill against the built-in simulated teacher, then train on its output."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "rmd.py"), "distill", "--limit=60", "--progress=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "simulated teacher" in run.stderr and os.path.exists(tmp_path / "out/distill/train.jsonl")
    assert "workers 16" in run.stderr  # the in-process teacher gets the demo's workers, a real one the default 8
    run = subprocess.run([sys.executable, os.path.join(ROOT, "rmd.py"), "train", "--max-steps=2", "--batch-size=4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.load(open(tmp_path / "out/train/eval.json"))["accuracy"]
    assert set(metrics) >= {"normal", "hard"} and all(0 <= v <= 1 for v in metrics.values())
    assert "final eval: normal" in run.stdout
    assert "best-of-8" in run.stdout and "random pick" in run.stdout  # the demo explains its numbers
    # ... next to label distillation's on the same teacher, data, student and steps (its own run, its own folder)
    baseline = json.load(open(tmp_path / "out/train-label/eval.json"))
    assert json.load(open(tmp_path / "out/train-label/config.json"))["loss"] == "bt"
    table = run.stdout[run.stdout.index("What the numbers mean"):].splitlines()
    assert "rmd (this run)" in table[1] and "label distillation" in table[1]
    hard = table[3].split()
    assert hard[0] == "hard" and hard[2] == f"{100 * baseline['accuracy']['hard']:.1f}%"


def test_demo_takes_back_the_baselines_cores_once_it_has_exited(monkeypatch):
    """The demo and its baseline split the cores; when the baseline's process is gone the demo's on_step takes
    them all, and not before. A thread count the user set (OMP_NUM_THREADS) is left alone."""
    import torch

    class Process:
        code = None

        def poll(self):
            return self.code
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        baseline = Process()
        on_step = builtin.take_back_cores((baseline, None))
        on_step(1, {})
        assert torch.get_num_threads() == 1  # still running
        baseline.code = 0
        on_step(2, {})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert builtin.take_back_cores(None) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert builtin.take_back_cores((Process(), None)) is None


# ------------------------------------------------------------------------------------------------ command line


def one_line_error(argv):
    """Run rmd.main in-process; the message of the SystemExit it must raise (an 'error: ...' line)."""
    with pytest.raises(SystemExit) as e:
        rmd.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


def test_options_md_is_every_commands_help_as_printed():
    """OPTIONS.md is generated from --help (`python rmd.py options > OPTIONS.md`): a new or changed option without
    regenerating it fails here, and every command's every option is in it."""
    import distill
    import serve
    from demo import sim_server
    with open(os.path.join(ROOT, "OPTIONS.md")) as f:
        assert f.read() == rmd.options_markdown(), "OPTIONS.md is stale: run `python rmd.py options > OPTIONS.md`"
    configs = {"distill": distill.DistillConfig, "train": train.TrainConfig, "eval": evaluation.EvalConfig,
               "bon": evaluation.BonConfig, "serve": serve.ServeConfig, "teacher-sim": sim_server.SimConfig}
    sections = rmd.options_markdown().split("## `python rmd.py ")[1:]
    assert [part.split("`")[0] for part in sections] == list(configs)
    for part, config in zip(sections, configs.values()):
        assert all(f"  --{f.name.replace('_', '-')} " in part for f in dataclasses.fields(config))


def test_every_command_has_help_generated_from_its_config(capsys):
    import distill
    configs = {"distill": distill.DistillConfig, "train": train.TrainConfig, "eval": evaluation.EvalConfig,
               "bon": evaluation.BonConfig, "serve": serve.ServeConfig}
    for command, config in configs.items():
        comments = cli.field_comments(config)
        for flag in ("--help", "-h"):
            with pytest.raises(SystemExit) as e:
                rmd.main([command, "--data=x.jsonl", flag])
            assert e.value.code == 0
            out = capsys.readouterr().out
            assert out.startswith(f"usage: python rmd.py {command} ")
            for f in dataclasses.fields(config):
                assert comments.get(f.name), f"{config.__name__}.{f.name} has no comment: --help needs one"
                line = next(x for x in out.splitlines() if x.split()[:1] == ["--" + f.name.replace("_", "-")])
                assert line.split()[1] == type(getattr(config(), f.name)).__name__
                assert line.rstrip().endswith(comments[f.name])
    with pytest.raises(SystemExit) as e:
        rmd.main(["teacher-sim", "--help"])
    assert e.value.code == 0 and "--port" in capsys.readouterr().out


def test_trl_and_hf_option_names():
    cfg = cli.parse_overrides(train.TrainConfig(), ["--learning-rate=3e-4", "--num-train-epochs", "2", "--output-dir=o",
                                                  "--model-name-or-path=m", "--max-length=128", "--warmup-ratio=0.1"])
    assert (cfg.lr, cfg.epochs, cfg.out, cfg.model, cfg.max_len, cfg.warmup) == (3e-4, 2, "o", "m", 128, 0.1)
    message = one_line_error(["train", "--data=x.jsonl", "--per-device-train-batch-size=8"])
    assert "--batch-size" in message and "--micro-batch" in message
    assert "did you mean --lr?" in one_line_error(["train", "--data=x.jsonl", "--lerning-rate=1"])
    assert "did you mean --eval-data?" in one_line_error(["train", "--eval-dat=x"])
    assert "did you mean train?" in one_line_error(["trian"])


def test_ordinary_mistakes_are_one_line_errors_in_every_command(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", easy_rows(4))
    bad = write_jsonl(tmp_path / "bad.jsonl", [easy_rows(1)[0], {"prompt": "p", "chosen": "a"}])
    wizard = write_jsonl(tmp_path / "wizard.jsonl", [{**easy_rows(1)[0], "prompt": [
        {"role": "wizard", "content": "hi"}, {"role": "user", "content": "q"}]}])
    (tmp_path / "empty_model").mkdir()
    out, tiny = f"--out={tmp_path / 'o'}", "--model=tiny-scratch"
    cases = [
        (["train", "--data=nope.jsonl"], "--data=nope.jsonl: no such file"),
        (["train", f"--data={tmp_path}"], "is a folder"),
        (["train", f"--data={good}", out], "--model is empty: give the student, a Hugging Face id"),
        (["train", f"--data={bad}", "--loss=bt", out, tiny], "bad.jsonl:2: missing field 'rejected'"),
        (["train", f"--data={wizard}", out, tiny], "wizard.jsonl:1: prompt[0] has role 'wizard'"),
        (["train", f"--data={good}", f"--model={tmp_path / 'empty_model'}"], "holds no model"),
        (["train", f"--data={good}", f"--model={tmp_path / 'x.gguf'}"], "no such .gguf file"),
        (["train", f"--data={good}", "--device=gpu", tiny], "is not a device"),
        (["eval", f"--model={tmp_path / 'empty_model'}", f"--data={good}"], "not an rmd reward-model folder"),
        (["bon", f"--model={tmp_path / 'nope'}", f"--data={good}"], "no such folder"),
        (["serve", "--model="], "needs --model"),
        (["distill", f"--data={good}"], "needs a teacher: pass --teacher-url"),
        (["distill", f"--data={good}", "--teacher-url=http://127.0.0.1:9/v1", out], "teacher_model is empty"),
        (["distill", f"--data={tmp_path}", "--teacher-url=http://127.0.0.1:9/v1", "--teacher-model=m", out],
         "is a folder"),
        (["distill", f"--data={write_jsonl(tmp_path / 'blank.jsonl', ['  ', ''])}",
          "--teacher-url=http://127.0.0.1:9/v1", "--teacher-model=m", out], "blank.jsonl: no rows"),
        (["distill", f"--data={write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'hi'}])}",
          "--teacher-url=http://127.0.0.1:9/v1", "--teacher-model=m", out], "p.jsonl:1: 1 row(s) are bare prompts"),
    ]
    if not torch.cuda.is_available():
        cases += [(["train", f"--data={good}", "--device=cuda", tiny], "CUDA is not available"),
                  (["eval", f"--model={tmp_path}", f"--data={good}", "--device=cuda"], "CUDA is not available")]
    for argv, expected in cases:
        assert expected in one_line_error(argv), argv


@pytest.mark.slow
def test_distill_turns_teacher_http_errors_into_one_line(tmp_path):
    from demo import sim, sim_server
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    common = [f"--data={data}", "--teacher-model=sim-teacher", "--max-retries=0", "--progress=false",
              f"--out={tmp_path / 'o'}"]
    message = one_line_error(["distill", f"--teacher-url=http://127.0.0.1:{closed}/v1"] + common)
    assert f"127.0.0.1:{closed}" in message and "connection_error" in message and "unreachable" in message
    url, shutdown = sim_server.start_server(sim.WorldConfig())
    try:
        assert "HTTP 404" in one_line_error(["distill", f"--teacher-url={url}/wrong"] + common)
    finally:
        shutdown()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "rmd.py"), "distill", "--data=nope.jsonl",
                          "--teacher-url=http://127.0.0.1:9/v1", "--teacher-model=m"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr == "error: nope.jsonl: no such file\n"


@pytest.mark.slow
def test_distill_that_keeps_nothing_fails_and_says_why(tmp_path):
    from demo import sim, sim_server
    data = write_jsonl(tmp_path / "outside.jsonl",  # questions the simulated teacher cannot judge or refine
                       [{"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "Paint."}])
    url, shutdown = sim_server.start_server(sim.WorldConfig())
    try:
        message = one_line_error(["distill", f"--data={data}", f"--teacher-url={url}", "--teacher-model=sim-teacher",
                                  "--progress=false", f"--out={tmp_path / 'o'}"])
    finally:
        shutdown()
    assert message.startswith("error: no pair was kept from 1 row(s)") and "failures.jsonl" in message


def data_readme_commands():
    """The `python rmd.py ...` lines of data/README.md, as argument lists."""
    import shlex
    with open(os.path.join(ROOT, "data", "README.md")) as f:
        lines = [x.strip() for x in f if x.strip().startswith("python rmd.py ")]
    return [shlex.split(x)[2:] for x in lines if "teacher-sim" not in x]


@pytest.mark.slow
def test_every_data_example_runs_as_its_readme_line_says(tmp_path, monkeypatch):
    """data/README.md's commands, shortened (1 step, outputs in tmp), against the in-process simulated teacher."""
    from demo import sim, sim_server
    commands = data_readme_commands()
    covered = {a.split("=")[1] for argv in commands for a in argv if a.startswith("--data=")}
    assert covered == {f"data/{f}" for f in os.listdir(os.path.join(ROOT, "data")) if f.endswith(".jsonl")}
    monkeypatch.chdir(ROOT)
    url, shutdown = sim_server.start_server(sim.WorldConfig())
    try:
        for k, argv in enumerate(commands):
            argv = [a for a in argv if not a.startswith("--out=")] + [f"--out={tmp_path / str(k)}"]
            if argv[0] == "distill":
                argv = [a if not a.startswith("--teacher-url=") else f"--teacher-url={url}" for a in argv]
                summary = rmd.distill_command(argv[1:] + ["--progress=false"])
                assert summary["kept"] > 0
            else:
                assert rmd.main(argv + ["--max-steps=1"]) == 0, argv
                assert os.path.exists(tmp_path / str(k) / "model" / "rmd.json")
    finally:
        shutdown()


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


def test_a_hub_model_id_is_passed_to_transformers_and_offline_is_one_line(monkeypatch):
    import transformers
    asked = []

    def offline(name, **kw):
        asked.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    train.check_model("Qwen/Qwen2.5-0.5B-Instruct")  # not refused
    with pytest.raises(UsageError) as e:
        load_backbone("Qwen/Qwen2.5-0.5B-Instruct")
    assert asked == ["Qwen/Qwen2.5-0.5B-Instruct"]
    message = str(e.value)
    assert "\n" not in message and "Hugging Face Hub" in message and "couldn't connect" in message
    with pytest.raises(UsageError, match="no such folder or file"):
        train.check_model("a/b/c")


def test_train_reads_json_arrays_and_trl_preference_formats(tmp_path):
    """A .json array (file:line errors point into it) and TRL's standard / conversational rows, unchanged."""
    q = [{"role": "user", "content": "How do I bake bread?"}]
    rows = [{"prompt": "How do I bake bread?", "chosen": "Knead it.", "rejected": "No."},  # TRL standard
            {"prompt": q, "chosen": [{"role": "assistant", "content": "Knead it."}],  # conversational
             "rejected": [{"role": "assistant", "content": "No."}]},
            {"chosen": q + [{"role": "assistant", "content": "Knead it."}],  # conversational, implicit prompt
             "rejected": q + [{"role": "assistant", "content": "No."}]}]
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    examples, stats = batches.load_pairs(str(path), ByteTokenizer(), 128)
    assert stats.kept == 3 and examples[0] == examples[1] == examples[2]
    path.write_text("[\n" + json.dumps(rows[0]) + ",\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n]")
    with pytest.raises(formats.DataError, match=r"d.json:3: missing field 'rejected'"):
        batches.load_pairs(str(path), ByteTokenizer(), 128)


def test_margin_zero_pairs_need_the_mse_loss(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 5, "rejected_score": 5},
            {"prompt": "p", "chosen": "a", "rejected": "c", "chosen_score": 7, "rejected_score": 2}]
    path = write_jsonl(tmp_path / "eq.jsonl", rows)
    examples, stats = batches.load_pairs(path, ByteTokenizer(), 64, need_margin=True, keep_ties=False)
    assert len(examples) == 1 and list(stats.dropped.values()) == [1]
    examples, _ = batches.load_pairs(path, ByteTokenizer(), 64, need_margin=True, keep_ties=True)
    assert [ex.margin for ex in examples] == [0.0, 5.0]


def test_original_pairs_of_train_jsonl_load_with_their_order_debiased_margin(tmp_path):
    provenance = {"source": "original", "annotate_scores": {"a_first": {"a": 8, "b": 3}, "b_first": {"a": 7, "b": 5}}}
    rows = [{"id": "r1:original", "prompt": "p", "chosen": "good", "rejected": "bad", "chosen_score": 7.5,
             "rejected_score": 4.0, "teacher_response": "t", "provenance": provenance},
            {"id": "r1", "prompt": "p", "chosen": "good, fixed", "rejected": "bad", "chosen_score": 9,
             "rejected_score": 4.0, "teacher_response": "t", "provenance": {"source": "refined"}}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)  # a kept row's original and refined pairs
    examples, stats = batches.load_pairs(path, ByteTokenizer(), 64, need_margin=True, teacher=True, keep_ties=False)
    assert [ex.margin for ex in examples] == [3.5, 5.0] and stats.kept == 2 and not stats.dropped


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
