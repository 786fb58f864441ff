"""cli.py (options from config dataclasses: parsing, help, TRL names, one-line errors) and the command line end to
end: rmd.py run as a user runs it (subprocesses, the demo), OPTIONS.md, every command's help and ordinary mistakes,
data/README.md's examples."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import cli
import distill
import evaluation
import formats
import rmd
import serve
import train
from demo import builtin
from formats import UsageError
from conftest import ROOT, easy_rows, one_line_error, write_jsonl


def test_library_errors_become_one_line_exits_only_at_an_entry_point():
    """parse_overrides raises (a notebook can catch it); one_line_errors, around an entry point, turns a UsageError or
    DataError into `error: <line>` and exit 1, and leaves a bug's traceback alone."""
    with pytest.raises(UsageError):
        cli.parse_overrides(distill.DistillConfig(), ["--workers=many"])
    for error in (UsageError("--x=1: wrong"), formats.DataError("f.jsonl:3: bad row")):
        with pytest.raises(SystemExit) as e, cli.one_line_errors():
            raise error
        assert e.value.code == f"error: {error}"
    with pytest.raises(KeyError), cli.one_line_errors():
        raise KeyError("a bug")


def test_parse_overrides():
    cfg = cli.parse_overrides(distill.DistillConfig(), ["--workers", "3", "--min-delta=2", "--disable_thinking",
                                                            "--json-mode", "off", "--keep-label-disagreements=0"])
    assert (cfg.workers, cfg.min_delta, cfg.disable_thinking, cfg.json_mode) == (3, 2.0, True, "off")
    with pytest.raises(UsageError, match=r"^unknown option --wrokers; did you mean --workers\?"):
        cli.parse_overrides(distill.DistillConfig(), ["--wrokers=3"])
    with pytest.raises(UsageError, match="^--workers='many': expected int"):
        cli.parse_overrides(distill.DistillConfig(), ["--workers=many"])


@dataclasses.dataclass
class HelpCfg:
    lr: float = 1e-5  # peak learning rate
    # pairs per optimizer step,
    # over all processes
    batch_size: int = 16
    micro_batch: int = 0  # pairs per forward pass
    out: str = "out/x"  # where it goes


def test_help_is_generated_from_the_config_comments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_overrides(HelpCfg(), ["--lr=1", "--help"], "python rmd.py x")
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: python rmd.py x [--key=value ...]"
    row = {line.split()[0]: line.split(None, 3)[1:] for line in lines if line.startswith("  --")}
    assert row["--lr"] == ["float", "1e-05", "peak learning rate"]
    assert row["--batch-size"] == ["int", "16", "pairs per optimizer step, over all processes"]
    assert row["--out"] == ["str", "out/x", "where it goes"]
    # every option of the real configs has a meaning (a new field needs its comment)
    for cfg in (distill.DistillConfig(),):
        comments = cli.field_comments(type(cfg))
        assert all(comments.get(f.name) for f in dataclasses.fields(cfg)), comments


def test_trl_names_are_aliases_or_answered_with_the_rmd_name():
    cfg = cli.parse_overrides(HelpCfg(), ["--learning-rate=3e-4", "--output-dir", "o", "--train_batch_size=8"])
    assert (cfg.lr, cfg.out, cfg.batch_size) == (3e-4, "o", 8)
    with pytest.raises(UsageError, match=r"^unknown option --per-device-train-batch-size .*--batch-size.*"
                                         r"--micro-batch"):
        cli.parse_overrides(HelpCfg(), ["--per-device-train-batch-size=4"])
    with pytest.raises(UsageError, match=r"did you mean --lr\?"):
        cli.parse_overrides(HelpCfg(), ["--lerning-rate=1"])
    with pytest.raises(UsageError, match=r"^unexpected argument 'x'") as e:
        cli.parse_overrides(HelpCfg(), ["x"])
    assert "\n" not in str(e.value)


def test_overrides_are_type_checked():
    cfg = cli.parse_overrides(train.TrainConfig(), ["--lr=3e-4", "--max-steps", "5", "--resume", "--loss=bt"])
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.loss) == (3e-4, 5, True, "bt")
    with pytest.raises(UsageError, match="expected int"):
        cli.parse_overrides(train.TrainConfig(), ["--max-steps=many"])


@pytest.mark.slow
def test_cli_without_data_says_what_to_pass(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "rmd.py"), "train"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "--data" in run.stderr and "rmd.py distill" in run.stderr
    run = subprocess.run([sys.executable, "rmd.py", "train", "--data=x.jsonl", "--lernrate=1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "unknown option --lernrate" in run.stderr


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
