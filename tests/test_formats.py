"""formats.py: data files and Hub datasets read into rows (every row form: explicit or implicit prompt, message
lists, TRL's formats, .json arrays, Parquet), margins from scores, stable row ids and shards, and errors that name
where and what (one validator for distill, train and eval)."""
import json
import os
import subprocess
import sys

import pytest

import batches
import formats
import train
from conftest import ROOT, easy_rows, record_fsyncs, synced_around, train_tiny, write_jsonl
from model import ByteTokenizer


def parquet_dataset(folder, splits):
    """A dataset folder laid out as on the Hub (data/<split>-00000-of-00001.parquet), readable offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return str(folder)


def test_hub_dataset_rows_come_through_datasets_with_their_split(tmp_path):
    pytest.importorskip("datasets")
    train = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    test = [{"prompt": "t", "chosen": "yes", "rejected": "no"}]  # splits share one schema (datasets requires it)
    folder = parquet_dataset(tmp_path / "ds", {"train": train, "test": test})
    assert list(formats.read_source_rows(f"hf:{folder}")) == list(enumerate(train, 1))  # split defaults to train
    assert [r["prompt"] for r in formats.load_distill_rows(f"hf:{folder}:test")] == ["t"]  # distill's reader
    assert formats.read_located_rows(f"hf:{folder}:test")[0][0] == f"hf:{folder}:test:1"  # eval's reader: where = spec:row


def test_hub_spec_names_owner_name_config_and_split():
    assert formats.hub_spec("hf:trl-lib/ultrafeedback_binarized") == ("trl-lib/ultrafeedback_binarized", None, "train")
    assert formats.hub_spec("hf:allenai/reward-bench/filtered:test") == ("allenai/reward-bench", "filtered", "test")
    for bad in ("hf:just-a-name", "hf:a/b/c/d", "hf:a//b", "hf:a/b:te st"):
        with pytest.raises(ValueError, match="hf:owner/name"):
            formats.hub_spec(bad)


def test_hub_dataset_without_the_datasets_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"needs the datasets package \(pip install datasets\)"):
        list(formats.read_source_rows("hf:trl-lib/ultrafeedback_binarized"))


@pytest.mark.slow
def test_hub_dataset_offline_is_one_line_that_says_so(tmp_path):
    pytest.importorskip("datasets")
    code = "import formats\ntry:\n    list(formats.read_source_rows('hf:nobody-rmd/no-such-set:test'))\n" \
           "except ValueError as e:\n    print('ERR', e)\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = next(l for l in out.stdout.splitlines() if l.startswith("ERR"))
    assert "hf:nobody-rmd/no-such-set:test: cannot load 'nobody-rmd/no-such-set' split 'test'" in line
    assert "HF_HUB_OFFLINE" in line


def test_write_jsonl_is_atomic_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    rows = [{"prompt": "é", "chosen": "a", "rejected": "b"}, {"id": 2}]
    formats.write_jsonl(str(path), rows)
    assert [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()] == rows
    assert not os.path.exists(str(path) + ".tmp")


def test_write_jsonl_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = record_fsyncs(monkeypatch)
    path = str(tmp_path / "out.jsonl")
    formats.write_jsonl(path, [{"id": 1}])
    before, after = synced_around(events, path + ".tmp", path)
    assert path + ".tmp" in before and str(tmp_path) in after


def test_write_jsonl_over_a_folder_named_like_its_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.tmp").mkdir()  # left by something else: the write still succeeds
    formats.write_jsonl(str(path), [{"id": 1}])
    assert path.read_text() == '{"id": 1}\n'


def test_progress_gives_elapsed_and_eta_as_a_bar_on_a_terminal_and_lines_in_a_log():
    import io

    import cli
    log = io.StringIO()
    progress = cli.Progress(200, "train", file=log, every=3600)
    progress.t0 -= 30  # 30 s in
    assert progress.line(50, "pair 0.5", now=progress.t0 + 30) == \
        "[train] 50/200 (25%) 0:30 elapsed, ETA 1:30 | pair 0.5"
    assert progress.line(0, now=progress.t0).endswith("ETA ?")
    progress.update(1)
    progress.update(2)  # within `every` of the last line: not printed in a log
    progress.update(200, final=True)
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/200", "200/200"] and "\r" not in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    bar = cli.Progress(4, "distill", file=term)
    bar.update(2)
    assert term.getvalue().startswith("\r\033[K[distill] |" + "#" * 12 + " " * 12 + "| 2/4 (50%)")
    assert cli.clock(3725) == "1:02:05"


def test_column_keys_rename_the_data_columns_in_every_reader(tmp_path):
    import batches
    import model
    from conftest import write_jsonl
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "good": "yes", "bad": "no", "chosen": "stale"}])

    class Cfg:
        prompt_key, chosen_key, rejected_key = "question", "good", "bad"
    keys = formats.column_keys(Cfg)
    assert keys == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    row = formats.load_distill_rows(path, keys=keys)[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("q", "yes", "no") and "good" not in row
    assert formats.read_located_rows(path, keys)[0][1]["chosen"] == "yes"
    examples, stats = batches.load_pairs(path, model.ByteTokenizer(), 64, keys=keys)
    assert stats.kept == 1
    with pytest.raises(ValueError, match=r"d.jsonl:1: missing field 'answer' \(--chosen-key=answer\)"):
        formats.load_distill_rows(path, keys={"chosen": "answer"})
    assert formats.column_keys(type("C", (), {"prompt_key": "", "chosen_key": "chosen", "rejected_key": ""})) == {}


def test_a_data_source_is_checked_before_anything_loads(tmp_path):
    assert formats.source_problem(str(tmp_path)).endswith("is a folder; give a data file (.jsonl, .jsonl.gz, .json, "
                                                         ".parquet) or hf:owner/name")
    assert formats.source_problem(str(tmp_path / "x.jsonl")).endswith("x.jsonl: no such file")
    assert "hf:owner/name" in formats.source_problem("hf:no-owner")
    assert formats.source_problem("hf:trl-lib/ultrafeedback_binarized:test") in (
        None, "hf:trl-lib/ultrafeedback_binarized:test: reading a Hub dataset needs the datasets package "
              "(pip install datasets)")


@pytest.mark.slow
def test_train_and_eval_read_a_hub_dataset_end_to_end(tmp_path):
    pytest.importorskip("datasets")
    import evaluation
    import train
    from conftest import easy_rows
    folder = parquet_dataset(tmp_path / "ds", {"train": easy_rows(16), "test": easy_rows(8, seed=3)})
    out = tmp_path / "run"
    train_tiny(train.TrainConfig(data=f"hf:{folder}", eval_data=f"test=hf:{folder}:test", out=str(out),
                                  model="tiny-scratch", loss="bt", lm_weight=0.0, max_steps=2, batch_size=4,
                                  max_len=64, log_interval=1, seed=0))
    result = json.load(open(out / "eval.json"))
    assert "test" in json.dumps(result)
    assert evaluation.default_out("eval", f"hf:{folder}:test", ".json").startswith(os.path.join("out", "eval", ""))
    assert evaluation.default_out("eval", "hf:trl-lib/ultrafeedback_binarized:test", ".json") == \
        os.path.join("out", "eval", "trl-lib_ultrafeedback_binarized_test.json")


def test_a_jsonl_file_is_read_as_jsonl_even_when_its_first_line_is_an_array(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}]\n{"prompt": "q"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: expected a JSON object, got list"):
        list(formats.read_source_rows(str(path)))  # used to be read as one JSON array (then line 2 was "text after")
    one_row = tmp_path / "one.jsonl"
    one_row.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):  # not silently one row of an array
        list(formats.read_source_rows(str(one_row)))
    array = tmp_path / "rows.json"
    array.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": "q"}]\n')
    assert [n for n, _ in formats.read_source_rows(str(array))] == [1, 2]  # .json: an array


HH = "\n\nHuman: How do I bake bread?\n\nAssistant:"


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


def test_example_files_in_data_are_read_by_train_and_distill():
    tok = ByteTokenizer()
    for name, need_margin in (("pairs", False), ("distilled", True), ("hh_style", False)):
        examples, stats = batches.load_pairs(os.path.join(ROOT, "data", f"{name}.jsonl"), tok, 512, need_margin)
        assert stats.kept == stats.rows > 0
    kinds = {name: {r["kind"] for r in formats.load_distill_rows(os.path.join(ROOT, "data", f"{name}.jsonl"))}
             for name in ("pairs", "pools", "prompts", "hh_style")}
    assert kinds == {"pairs": {"pair"}, "pools": {"pool"}, "prompts": {"prompt"}, "hh_style": {"pair"}}


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


def test_input_files_from_other_tools_are_read(tmp_path):
    """A BOM and CRLF are accepted; a non-UTF-8 byte, a folder, a missing or empty file are file:line errors."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": "b"}\r\n')
    assert [(r["line"], r["prompt"]) for r in formats.load_distill_rows(str(path))] == [(1, "a"), (3, "b")]
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        formats.load_distill_rows(str(path))
    for text in ("", "\n  \n\t\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match=r"in.jsonl: no rows"):
            formats.load_distill_rows(str(path))
    with pytest.raises(ValueError, match=r"is a folder"):
        formats.load_distill_rows(str(tmp_path))
    with pytest.raises(ValueError, match=r"nope.jsonl: no such file"):
        formats.load_distill_rows(str(tmp_path / "nope.jsonl"))
    array = tmp_path / "in.json"  # one JSON array: each element's line is its file:line
    array.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b",\n   "id": 7}\n]\n')
    assert [(r["line"], r["id"]) for r in formats.load_distill_rows(str(array))][1] == (3, "7")
    array.write_text('[\n  {"prompt": "a"},\n  {"prompt": 5}\n]')
    with pytest.raises(ValueError, match=r"in.json:3: field 'prompt' must be"):
        formats.load_distill_rows(str(array))


def test_unknown_chat_role_is_rejected_with_file_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "wizard", "content": "hi"}, {"role": "user", "content": "x"}],
                                "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"in.jsonl:1: prompt\[0\] has role 'wizard'; a role is one of system, "):
        formats.load_distill_rows(str(path))


def test_bad_rows_get_file_line_errors(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n\n{"prompt": 5}\n{not json\n')
    with pytest.raises(ValueError, match=r"in.jsonl:4: not valid JSON"):
        formats.load_distill_rows(str(path))
    path.write_text('{"prompt": "ok", "chosen": "a"}\n{"prompt": [{"role": "user"}]}\n{"id": 1, "prompt": "x"}\n'
                    '{"id": 1, "prompt": "y"}\n{"prompt": "p", "responses": ["one"]}\n')
    with pytest.raises(ValueError) as e:
        formats.load_distill_rows(str(path))
    for line in (1, 2, 4, 5):
        assert f"in.jsonl:{line}:" in str(e.value)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "field 'chosen' must be a string or a message list ending in an "
                                                      "assistant message"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected' (rows need prompt, chosen, rejected)"),
    ({"chosen": "Hi there", "rejected": "Bye"}, "no 'prompt' field and chosen/rejected share no prompt prefix"),
])
def test_distill_train_and_eval_say_the_same_about_the_same_bad_pair(tmp_path, row, message):
    """One validator (formats.split_pair) and one message per problem for every command."""
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError) as distill_error:
        formats.load_distill_rows(str(path))
    with pytest.raises(formats.DataError) as train_error:
        formats.parse_row(row, f"{path}:1")
    assert f"{path}:1: {message}" in str(distill_error.value) and str(train_error.value) == f"{path}:1: {message}"
    if row.get("chosen") == 5:
        with pytest.raises(formats.DataError, match="field 'chosen' must be a string or a message list"):
            formats.answer_of(5, "chosen", f"{path}:1")


def test_row_ids_are_stable_and_shards_partition(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i % 5}"}) + "\n" for i in range(10)))
    loaded = formats.load_distill_rows(str(path))
    assert len({r["id"] for r in loaded}) == 10 and loaded[0]["id"] == formats.row_id({"prompt": "p0"})
    shards = [formats.load_distill_rows(str(path), shard=f"{k}/3") for k in range(3)]
    assert sorted(r["line"] for s in shards for r in s) == list(range(1, 11))


def test_parquet_rows_or_a_one_line_error_naming_pyarrow(tmp_path, monkeypatch):
    path = str(tmp_path / "in.parquet")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        pass
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"prompt": "a", "chosen": "x", "rejected": "y"}] * 2),
                                    path)
        assert [(r["line"], r["kind"]) for r in formats.load_distill_rows(path)] == [(1, "pair"), (2, "pair")]
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"^[^\n]*in.parquet: reading Parquet needs the pyarrow package "
                                         r"\(pip install pyarrow\)$"):
        formats.load_distill_rows(path)
