"""formats.py: data files and Hub datasets read into rows, with errors that name where and what."""
import json
import os
import subprocess
import sys

import pytest

import formats
from conftest import ROOT, record_fsyncs, synced_around, train_tiny


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
