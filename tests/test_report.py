"""Issue 12, item 5: the report.html pages of `train` and `distill` (report.py), their numbers and diff markup, a
real headless browser rendering each (Debian's chromium, when installed), and --report-to's trackers."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

import distill
import report
import rmd
import train
from conftest import easy_rows, log_losses, train_cfg, train_tiny, write_jsonl
from demo import sim, sim_server
from formats import UsageError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A tiny train run with an interim evaluation, an eval file and a held-out split."""
    tmp = tmp_path_factory.mktemp("train")
    data = write_jsonl(tmp / "train.jsonl", easy_rows(48))
    test = write_jsonl(tmp / "test.jsonl", easy_rows(12, seed=1))
    cfg = train_cfg(tmp, data, eval_data=f"test={test}", holdout=8, max_steps=6, eval_interval=3, batch_size=4,
                    max_len=64)
    metrics = train_tiny(cfg)
    return cfg, metrics


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A tiny distill run against the simulated teacher."""
    tmp = tmp_path_factory.mktemp("distill")
    world = sim.WorldConfig(n_distill=16)
    paths = sim.write_builtin_data(str(tmp / "data"), world)
    url, shutdown = sim_server.start_server(world, port=0)
    try:
        summary = distill.distill(distill.DistillConfig(
            data=paths["distill"], out=str(tmp / "distill"), teacher_url=url, teacher_model=sim.TEACHER_MODEL,
            workers=4, progress=False))
    finally:
        shutdown()
    return str(tmp / "distill"), summary


def page_of(out):
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------ building blocks

def test_word_diff_marks_the_edit_and_escapes_everything():
    old, new = "The sum is <b>5</b> & done.", "The sum is <b>7</b> & done, checked."
    marked = report.word_diff(old, new)
    assert "<del>&lt;b&gt;5&lt;/b&gt;</del><ins>&lt;b&gt;7&lt;/b&gt;</ins>" in marked
    assert "<b>" not in marked and "&amp;" in marked
    # the markup is exactly the edit: drop the insertions to get old back, drop the deletions to get new
    assert html.unescape(re.sub(r"<ins>.*?</ins>|</?del>", "", marked)) == old
    assert html.unescape(re.sub(r"<del>.*?</del>|</?ins>", "", marked)) == new
    assert report.word_diff("same words", "same words") == "same words"
    assert report.word_edits("a b c d", "a b x d") == 1
    # added text counts (the old "% of words changed" said 0% for an answer grown to three times its length)
    assert report.word_edits("a b", "a b c d e f") == 4 and report.edit_ratio("a b", "a b c d e f") == 2.0
    assert report.word_edits("a b c", "x y") == 3 and report.word_edits("", "") == 0
    assert report.edit_stats([("a b", "a b"), ("a b", "a x"), ("a", "a b c")]) == \
        {"pairs": 3, "median": 0.5, "mean": 0.833, "over_1": 1}


def test_histogram_counts_every_value_once():
    svg = report.histogram("h", {"chosen": [0.0, 0.1, 1.0, 1.0], "rejected": [-1.0]}, bins=4)
    counts = [int(c) for c in re.findall(r"\): (\d+)</title></rect>", svg)]
    assert sum(counts) == 5 and "chosen (4)" in svg and "rejected (1)" in svg
    assert "<svg" in report.histogram("empty", {"x": []})  # no values: still a valid (empty) chart


def test_histogram_on_a_grid_labels_each_bar_with_its_value():
    """Issue 19: Δs on the half-point grid; a bar of zeros was labelled "[-0.5, 0)"."""
    svg = report.histogram("d", {"pairs": [0.0, 0.0, 1.5, 2.0, 2.0, 2.0]}, mark=1.0, step=0.5)
    titles = dict(re.findall(r"<title>pairs (= [-\d.]+): (\d+)</title></rect>", svg))
    assert titles == {"= 0": "2", "= 1.5": "1", "= 2": "3"}
    assert "[-0.5, 0)" not in svg


# ------------------------------------------------------------------------------------------------ train page

@pytest.mark.slow
def test_train_report_has_the_charts_and_the_numbers(train_run, capsys):
    cfg, metrics = train_run
    page = page_of(cfg.out)
    assert page.count("<svg") == 6  # loss, pair accuracy, lr, eval accuracy, rewards of test and heldout
    for title in ("loss", "pair accuracy (training batches)", "learning rate", "evaluation accuracy",
                  "rewards on test: chosen vs rejected", "rewards on heldout: chosen vs rejected"):
        assert f"<title>{html.escape(title)}</title>" in page
    assert "LM loss" in page and "total (pair + 0.1 LM)" in page
    # the saved per-pair rewards give the final accuracy, and the page shows it
    rewards = json.load(open(os.path.join(cfg.out, "eval_rewards.json")))
    assert {k: len(v["chosen"]) for k, v in rewards.items()} == {"test": 12, "heldout": 8}
    for split, r in rewards.items():
        assert sum(c > j for c, j in zip(r["chosen"], r["rejected"])) / len(r["chosen"]) == metrics[split]
        assert f"chosen ({len(r['chosen'])})" in page
    assert f"<td>test</td><td>12</td><td>{report.fmt(metrics['test'])}</td>" in page
    # eval accuracy over steps: the interim evaluation (step 3) and the final one (step 6)
    assert [r["step"] for r in report.read_jsonl(os.path.join(cfg.out, "eval_log.jsonl"))] == [3]
    assert "evaluation accuracy" in page and "test step 3:" in page and "test step 6:" in page
    assert "loss" in page and len(re.findall(r"pair loss step \d+:", page)) == 6


@pytest.mark.slow
def test_train_prints_the_report_path(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(8))
    cfg = train_cfg(tmp_path, data, max_steps=0, lm_weight=0.0)  # no eval split, no step: the page still works
    train_tiny(cfg)
    assert f"report: {os.path.join(cfg.out, 'report.html')}" in capsys.readouterr().out
    page = page_of(cfg.out)
    assert "No training step was logged" in page and "No evaluation split" in page and "No per-pair rewards" in page


@pytest.mark.slow
def test_resumed_run_report_has_each_step_once(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(24))
    test = write_jsonl(tmp_path / "test.jsonl", easy_rows(6, seed=1))
    cfg = train_cfg(tmp_path, data, eval_data=f"test={test}", max_steps=4, eval_interval=1, batch_size=4,
                    max_len=64, lm_weight=0.0)
    train_tiny(cfg, stop_after=2)
    report.append_eval(cfg.out, 3, {"test": 0.123})  # an evaluation logged after the checkpoint, then killed
    train_tiny(train.TrainConfig(**{**vars(cfg), "resume": True}))
    assert [s for s, *_ in log_losses(cfg.out)] == [1, 2, 3, 4]
    page = page_of(cfg.out)
    assert len(re.findall(r"pair loss step \d+:", page)) == 4
    assert len(re.findall(r"test step \d+:", page)) == 4 and "0.123" not in page  # the rerun's step 3 wins


# ------------------------------------------------------------------------------------------------ distill page

@pytest.mark.slow
def test_distill_report_shows_stages_bias_filters_margins_and_edits(distill_run):
    out, summary = distill_run
    page = page_of(out)
    for stage, st in summary["stages"].items():
        assert f"<td>{stage}</td><td>{st['sent']}</td><td>{st['cache_hits']}</td>" in page
    bias = summary["position_bias"]
    assert f"{bias['disagreements']}/{bias['pairs']} pairs ({100 * bias['rate']:.1f}%)" in page
    assert f"<td>refined pairs kept</td><td>{summary['kept']}</td>" in page
    for reason, n in summary["dropped"].items():
        assert f"<td>dropped: {html.escape(reason)}</td><td>{n}</td>" in page
    rows = [json.loads(line) for line in open(os.path.join(out, "train.jsonl"))]
    refined = [r for r in rows if r["provenance"]["source"] == "refined"]
    assert summary["kept"] == len(refined) > 0
    assert f"refined pairs ({len(refined)})" in page and "<title>Δs of the refined pairs" in page
    assert page.count('<div class="pair">') == min(12, len(refined))
    assert "<del>" in page and "<ins>" in page  # each y_w* is an edit of its y_l
    first = refined[0]
    assert report.word_diff(first["rejected"], first["chosen"]) in page


@pytest.mark.slow
def test_distill_prints_the_report_path(distill_run, capsys):
    out, summary = distill_run
    cfg = distill.DistillConfig(out=out, data="x.jsonl")
    rmd.say_what_distill_wrote(cfg, summary, demo=False)
    assert f"{os.path.join(out, 'report.html')} (the run in pictures)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ a real browser

def browser_problems(path):
    """Load a page in headless chromium -> (dumped DOM, console/JS error lines)."""
    run = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--user-data-dir=" + os.path.join(os.path.dirname(path), ".chromium"),
                          "--dump-dom", "file://" + os.path.abspath(path)],
                         capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, errors


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: apt-get install chromium")


@pytest.mark.slow
@needs_chromium
def test_the_browser_check_catches_a_script_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><svg></svg><script>undefined_function()</script></body></html>")
    _, errors = browser_problems(str(bad))
    assert errors and "undefined_function" in errors[0]


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("which", ["train", "distill"])
def test_each_page_renders_in_a_headless_browser(which, train_run, distill_run):
    out = train_run[0].out if which == "train" else distill_run[0]
    dom, errors = browser_problems(os.path.join(out, "report.html"))
    assert errors == []
    assert dom.count("<svg") == page_of(out).count("<svg") > 0  # parsed as markup, every chart in the DOM
    assert "<rect" in dom and "<title>" in dom
    if which == "distill":
        assert "<del>" in dom and "<ins>" in dom


# ------------------------------------------------------------------------------------------------ --report-to

def test_report_to_a_missing_package_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for kind, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        with pytest.raises(UsageError) as e:
            train.open_tracker(kind, str(tmp_path), {})
        assert str(e.value).startswith(f"--report-to={kind} needs") and f"pip install {package}" in str(e.value)
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(8))
    with pytest.raises(UsageError, match="must be one of none, tensorboard, wandb"):
        train.validate(train_cfg(tmp_path, data, report_to="mlflow"))


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files_tensorboard_reads_back(tmp_path):
    """The real package: the event file under <out>/tensorboard holds log.jsonl's numbers, step by step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    cfg = train_cfg(tmp_path, data, max_steps=3, batch_size=4, max_len=64, report_to="tensorboard")
    train_tiny(cfg)
    events = EventAccumulator(os.path.join(cfg.out, "tensorboard"))
    events.Reload()
    records = report.read_jsonl(os.path.join(cfg.out, "log.jsonl"))
    assert set(events.Tags()["scalars"]) == {k for r in records for k in r if k != "step"}
    for key in ("pair_loss", "lr", "accuracy"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]


@pytest.mark.slow
def test_report_to_tensorboard_logs_the_log_jsonl_scalars(monkeypatch, tmp_path):
    logged = []

    class FakeWriter:  # records the calls (the eval scalars and close), next to the real-package test above
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            logged.append((step, key, value))

        def close(self):
            logged.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    data = write_jsonl(tmp_path / "train.jsonl", easy_rows(16))
    test = write_jsonl(tmp_path / "test.jsonl", easy_rows(4, seed=1))
    cfg = train_cfg(tmp_path, data, eval_data=f"test={test}", max_steps=2, batch_size=4, max_len=64,
                    report_to="tensorboard")
    metrics = train_tiny(cfg)
    assert logged[-1] == "closed"
    records = report.read_jsonl(os.path.join(cfg.out, "log.jsonl"))
    expected = [(r["step"], k, v) for r in records for k, v in r.items() if k != "step"]
    assert [x for x in logged[:-1] if not x[1].startswith("eval_")] == expected
    assert (2, "eval_accuracy/test", metrics["test"]) in logged
