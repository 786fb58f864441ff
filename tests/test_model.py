"""model.py: the cutting rule (the question's end, then the answer's start), the packed reward model (rewards
independent of packing, padding side and batch size), the fused LM term, loading a backbone."""
import pytest
import torch
import torch.nn.functional as F

import batches
import formats
import loss
import train
from conftest import chatml_tokenizer, easy_rows, tiny_model, with_likelihood, write_jsonl
from formats import UsageError
from model import ByteTokenizer, answer_ids, encode, fit, load_backbone, prompt_floor, render_prompt


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


def plain_likelihood_reward(model, prompt, answer):
    """The reference: value head at the last token + w x sum of log p_ref(answer token), full logits of one sequence
    from the frozen reference LM."""
    ids = torch.tensor([prompt + answer])
    hidden = model.lm.model(input_ids=ids).last_hidden_state
    logp = model.reference(input_ids=ids).logits[0].float().log_softmax(-1)
    loglik = sum(logp[len(prompt) - 1 + j, token] for j, token in enumerate(answer))
    return model.value_head(hidden[0, -1]).squeeze(-1) + model.likelihood_weight[0] * loglik


def test_the_likelihood_term_is_read_alike_by_every_reward_path(tmp_path):
    model = tiny_model(likelihood=True).eval()
    rows = easy_rows(6)
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", rows), model.tokenizer, 256)
    pieces = [(ex.prompt[0], ex.chosen) for ex in examples] + [(ex.prompt[1], ex.rejected) for ex in examples]
    with torch.no_grad():
        reference = torch.stack([plain_likelihood_reward(model, p, a) for p, a in pieces])
        paths = {layout: model(batches.collate(examples, model.pad_id, False, False, layout))[0]
                 for layout in ("separate", "shared")}
        for side in ("right", "left"):
            paths[side] = torch.tensor(model.sequence_rewards([p + a for p, a in pieces], 4, side,
                                                              [len(p) for p, _ in pieces]))
        paths["scored, prompts shared"] = torch.tensor(model.piece_rewards(pieces, 32))
        paths["score()"] = torch.tensor(model.score([r["prompt"] for r in rows] * 2,
                                                    [r["chosen"] for r in rows] + [r["rejected"] for r in rows]))
    assert reference.std() > 1.0  # the likelihood shows: answers differ by nats
    for name, rewards in paths.items():
        torch.testing.assert_close(rewards, reference, atol=1e-4, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="where each answer starts"):
        model.sequence_rewards([p + a for p, a in pieces])


def test_the_likelihood_term_trains_its_weight_and_sends_no_gradient_into_the_lm(tmp_path):
    examples, _ = batches.load_pairs(write_jsonl(tmp_path / "d.jsonl", easy_rows(6)), ByteTokenizer(), 256)
    batch = batches.collate(examples, 256, False, False, "shared")
    plain = tiny_model()
    model = with_likelihood(plain)  # the same LM and value head, plus the term and its frozen reference
    grads = {}
    for name, m in (("plain", plain), ("likelihood", model)):
        m.zero_grad(set_to_none=True)
        rewards, _ = m(batch)
        (rewards[:6] - rewards[6:]).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads["likelihood"]) == set(grads["plain"]) | {"likelihood_weight"}  # nothing of the reference
    for name, grad in grads["plain"].items():  # the likelihood adds nothing to the LM's gradient
        torch.testing.assert_close(grads["likelihood"][name], grad, atol=0, rtol=0, msg=name)
    gaps = sum(plain_likelihood_reward(model, ex.prompt[0], ex.chosen).item() -
               plain_likelihood_reward(model, ex.prompt[1], ex.rejected).item() for ex in examples)
    with torch.no_grad():
        value_gaps = sum((plain.value_head(plain.lm.model(input_ids=torch.tensor([ex.prompt[0] + ex.chosen]))
                                           .last_hidden_state[0, -1]) -
                          plain.value_head(plain.lm.model(input_ids=torch.tensor([ex.prompt[1] + ex.rejected]))
                                           .last_hidden_state[0, -1])).item() for ex in examples)
    # d(sum of reward gaps)/dw = the sum of the reference's log-likelihood gaps = (gaps - value-head gaps) / w
    torch.testing.assert_close(grads["likelihood"]["likelihood_weight"][0].item(), (gaps - value_gaps) / 0.3,
                               atol=1e-3, rtol=1e-4)


def test_the_likelihood_weight_is_saved_and_loaded_with_the_head(tmp_path):
    from model import load_reward_model, save_reward_model
    model = tiny_model(head="linear", likelihood=True).eval()
    save_reward_model(model, tmp_path / "rm")
    loaded = load_reward_model(str(tmp_path / "rm"))
    prompts, answers = ["What is 2 + 3?"] * 2, ["5", "It is 6."]
    assert loaded.likelihood and loaded.likelihood_weight.item() == pytest.approx(0.3)
    assert loaded.score(prompts, answers) == pytest.approx(model.score(prompts, answers), abs=1e-5)
    meta = __import__("json").loads((tmp_path / "rm" / "rmd.json").read_text())
    assert meta["likelihood"] and meta["hf_sequence_classification"] is None  # a classifier cannot add it


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
