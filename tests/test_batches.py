"""batches.py's layouts: prefix-shared pairs (a pair's prompt computed once, its answers each attending to it and to
themselves) against the plain layout (every row with its own copy of the prompt) -- rewards, losses and every
gradient equal within fp32 tolerances; the attention mask; the per-batch choice; prompt sharing at scoring time.
Then load_pairs' cutting counts and warnings, its dropped rows (identical after cutting, margin-0 ties), and
collate's packing.

Tolerances (fp32, CPU): only the order of floating-point sums differs between the layouts (other bins, other row
lengths), so rewards and losses agree to atol 1e-5 and gradients to atol 1e-5 + rtol 1e-4."""
import pytest
import torch

import batches
import formats
import train
from conftest import chatml_tokenizer, easy_rows, tiny_model, write_jsonl
from model import CUT_KINDS, ByteTokenizer, RewardModel, attention_key_cost, prefix_sharing_mask


def smollm2_shaped(seed=0, layers=2):
    """SmolLM2-135M's shape (hidden 576, 9 query heads over 3 key-value heads, MLP 1536, RoPE theta 1e5), fewer
    layers, random weights, a small in-memory ChatML tokenizer: built from a config, nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = chatml_tokenizer()
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=True))
    return RewardModel(lm, tokenizer, "mlp", 0.0, 256)


MODELS = {"tiny": lambda: tiny_model(seed=0), "smollm2-shaped": smollm2_shaped}


def mixed_rows(n=12):
    """Pairs whose prompts and answers vary in length: at a small max_len some pairs keep the same prompt in both
    rows (and in the teacher row), others are cut to different prompts."""
    return [{"prompt": f"Question {i}: " + "the question? " * (3 + i % 17), "chosen": "good answer " * (1 + i % 5),
             "rejected": "bad x y " * (1 + (3 * i) % 11), "chosen_score": 8, "rejected_score": 3 - i % 3,
             "teacher_response": "the good answer " * (1 + i % 9)} for i in range(n)]


def examples_for(model, tmp_path, max_len):
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", mixed_rows()), model.tokenizer, max_len,
                                     teacher=True)
    return examples


def step(model, batch, lm_weight=0.5):
    """train.step_loss + backward -> (rewards, loss, LM loss, gradients of every parameter)."""
    model.zero_grad(set_to_none=True)
    rewards, _ = model(batch)
    loss, _, lm, _ = train.step_loss(model, batch, "mse", lm_weight, batch.n_pairs,  # the batches carry margins
                                     max(1, len(batch.lm_target)))
    loss.backward()
    return rewards.detach(), loss.detach(), lm.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("use_lm", [False, True])
def test_shared_prompts_give_the_same_rewards_losses_and_gradients(tmp_path, name, use_lm):
    model = MODELS[name]().train()
    max_len = {"tiny": 200, "smollm2-shaped": 64}[name]
    examples = examples_for(model, tmp_path, max_len)
    cut_differently = sum(ex.prompt[0] != ex.prompt[1] for ex in examples)
    assert 0 < cut_differently < len(examples)  # both cases are in the batch
    plain = batches.collate(examples, model.pad_id, use_lm, True, layout="separate")
    shared = batches.collate(examples, model.pad_id, use_lm, True, layout="shared")
    assert (shared.shared_pairs, shared.separate_pairs) == (len(examples) - cut_differently, cut_differently)
    assert plain.sequence_ids is None and shared.sequence_ids is not None
    saved = sum(len(ex.prompt[0]) * (1 + (use_lm and ex.teacher[0] == ex.prompt[0]))
                for ex in examples if ex.prompt[0] == ex.prompt[1])
    assert shared.real_tokens == plain.real_tokens - saved  # each shared prompt computed once
    assert torch.equal(shared.lm_target.sort().values, plain.lm_target.sort().values)
    r_plain, loss_plain, lm_plain, g_plain = step(model, plain)
    r_shared, loss_shared, lm_shared, g_shared = step(model, shared)
    torch.testing.assert_close(r_shared, r_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_shared, loss_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(lm_shared, lm_plain, atol=1e-5, rtol=0)
    assert use_lm == (lm_plain > 0)
    for param in g_plain:
        torch.testing.assert_close(g_shared[param], g_plain[param], atol=1e-5, rtol=1e-4, msg=param)


def test_the_mask_lets_each_answer_see_its_prompt_and_itself_only():
    # one row: prompt P P, answers A A and B, then a plain sequence S S, then padding
    sequence_ids = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 3]])
    branch_ids = torch.tensor([[0, 0, 1, 1, 2, 0, 0, 0]])
    mask = prefix_sharing_mask(sequence_ids, branch_ids, "sdpa")[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 1, 0, 0, 0],  # B sees the prompt and itself, not A
                             [0, 0, 0, 0, 0, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0, 0, 1]])
    assert torch.equal(mask, expected)
    additive = prefix_sharing_mask(sequence_ids, branch_ids, "eager")[0, 0]
    assert torch.equal(additive == 0, expected.bool())
    with pytest.raises(ValueError, match="--share-prompts=off"):
        prefix_sharing_mask(sequence_ids, branch_ids, "flash_attention_2")


def test_eager_attention_takes_the_additive_mask(tmp_path):
    model = smollm2_shaped().eval()
    examples = examples_for(model, tmp_path, 64)
    with torch.no_grad():
        plain, _ = model(batches.collate(examples, model.pad_id, False, False))
        model.lm.set_attn_implementation("eager")
        shared, _ = model(batches.collate(examples, model.pad_id, False, False, layout="shared"))
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)


def test_auto_layout_shares_long_prompts_and_not_short_ones():
    model = smollm2_shaped()
    key_cost = attention_key_cost(model.lm)
    assert 1 / 4000 < key_cost < 1 / 2000  # SmolLM2-135M's layers: one key ~ 1/3000 of a token
    ids = lambda n, start=10: [start + i % 200 for i in range(n)]  # noqa: E731
    long_prompts = [batches.Example(prompt=(ids(600), ids(600)), chosen=ids(100, 50), rejected=ids(80, 60),
                                    margin=1.0, teacher=None) for _ in range(4)]
    short_prompts = [batches.Example(prompt=(ids(20), ids(20)), chosen=ids(900, 50), rejected=ids(900, 60),
                                     margin=1.0, teacher=None) for _ in range(4)]
    shared = batches.collate(long_prompts, 0, False, True, layout="auto", key_cost=key_cost)
    assert shared.shared_pairs == 4 and shared.sequence_ids is not None
    plain = batches.collate(short_prompts, 0, False, True, layout="auto", key_cost=key_cost)
    # rows of 920 pack without padding; sharing saves 20 of 1840 tokens but doubles the bins' length (attention)
    assert plain.shared_pairs == 0 and plain.sequence_ids is None


def test_scoring_shares_a_prompt_among_its_answers(tmp_path, monkeypatch):
    """score() (eval) and piece_rewards (bon) give each answer the reward it gets alone, on either padding side,
    with the answers to one prompt in one row."""
    model = smollm2_shaped().eval()
    prompts = [r["prompt"] for r in mixed_rows(6)]
    answers = ["good answer " * (1 + k) for k in range(4)]
    items = [(p, a) for p in prompts for a in answers]
    alone = [model.score([p], [a], max_len=256)[0] for p, a in items]
    shared_rows = []
    real = model.shared_rewards
    monkeypatch.setattr(model, "shared_rewards", lambda pieces, chunks, *a: shared_rows.extend(chunks) or
                        real(pieces, chunks, *a))
    for side in ("right", "left"):
        together = model.score([p for p, _ in items], [a for _, a in items], batch_size=8, max_len=256,
                               padding_side=side)
        torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=0)
    assert shared_rows and all(len(chunk) > 1 for chunk in shared_rows)


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


def test_collate_packs_with_little_padding(tmp_path):
    model = tiny_model()
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", easy_rows(32)), model.tokenizer, 256)
    batch = batches.collate(examples, model.pad_id, True, True)
    assert batch.real_tokens / batch.input_ids.numel() > 0.9
    longest = max(len(ex.prompt[0]) + len(ex.chosen) for ex in examples)
    assert longest <= batch.input_ids.shape[1] <= 2 * longest  # attention never costs more than 4x padding's


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
