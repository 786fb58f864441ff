"""The documented copy sets: each is copied, exactly, into an empty folder and its docstring's example runs there
with nothing else of rmd importable (`python -I`, the folder alone on sys.path):

- loss.py alone (torch only): the student's two losses;
- teacher.py alone (standard library + requests): the HTTP client and the request cache;
- asker.py + teacher.py + protocol.py + formats.py: asking a teacher your own questions (no distill.py);
- model.py + formats.py: loading and scoring a trained reward model."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, tiny_model
from tools.fault_server import FaultServer

pytestmark = pytest.mark.slow  # each story starts a Python process
REPO_MODULES = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")) + ["demo", "tools"]


def run_copied(tmp_path, files, code, *argv):
    """Copy `files` from the repository into an empty folder and run `code` there, that folder alone importable;
    the code ends by checking that no other repository module was imported."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in files:
        shutil.copy(os.path.join(ROOT, name), alone / name)
    others = [m for m in REPO_MODULES if m + ".py" not in files]
    check = f"\nleaked = [m for m in {others!r} if m in sys.modules]\nassert not leaked, leaked\n"
    script = "import sys\nsys.path.insert(0, " + repr(str(alone)) + ")\n" + textwrap.dedent(code) + check
    out = subprocess.run([sys.executable, "-I", "-c", script, *argv], capture_output=True, text=True, cwd=alone,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_loss_py_alone(tmp_path):
    """loss.py's docstring: L = pairwise_loss(chosen, rejected, margins, kind) + lm_weight * linear_cross_entropy."""
    run_copied(tmp_path, ["loss.py"], """
        import torch, torch.nn.functional as F
        from loss import linear_cross_entropy, pairwise_loss
        chosen, rejected = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
        hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        labels = torch.tensor([1, 2, -100, 4, 5, 10])
        L = pairwise_loss(chosen, rejected, torch.tensor([2., 1., 3., 0.]), kind="mse") + \\
            0.1 * linear_cross_entropy(hidden, weight, labels)
        L.backward()
        naive = ((chosen - rejected - torch.tensor([2., 1., 3., 0.])) ** 2).mean() + \\
            0.1 * F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
        assert torch.allclose(L, naive, atol=1e-5), (L, naive)
    """)


def test_teacher_py_alone(tmp_path):
    """teacher.py's docstring: a Client posts a request, the Cache keeps it (exactly once)."""
    with FaultServer() as server:
        run_copied(tmp_path, ["teacher.py"], """
            import dataclasses
            from teacher import Cache, Client, RateLimiter, reply_problem, request_key
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}
            client = Client(sys.argv[1], workers=2, limiter=RateLimiter(rpm=500))
            reply, attempts = client.post(body)
            assert reply_problem(reply) is None and attempts == 1, reply
            cache = Cache("cache.jsonl")
            for expect_cached in (False, True):
                entry, cached = cache.fetch(request_key(body, "v1"),
                                            lambda: {"reply": dataclasses.asdict(client.post(body)[0])})
                assert cached == expect_cached and entry["reply"]["content"] == reply.content
        """, server.url)
        assert len(server.bodies) == 2  # the cached fetch sent nothing


def test_asking_a_teacher_needs_no_distill_py(tmp_path):
    """asker.py's docstring: Asker(AskerConfig(...)).ask(stage, client, body, parser), a parser's ParseError
    re-asked, with asker.py, teacher.py, protocol.py and formats.py only."""
    with FaultServer() as server:
        run_copied(tmp_path, ["asker.py", "teacher.py", "protocol.py", "formats.py"], """
            from asker import Asker, AskerConfig
            from protocol import ParseError
            def my_parser(text):
                if not text.strip():
                    raise ParseError("empty")
                return len(text)
            asker = Asker(AskerConfig(teacher_url=sys.argv[1], teacher_model="judge", out="out/x"),
                          stages=("judge",))
            body = asker.body(asker.cfg.teacher_model, [{"role": "user", "content": "Is 2+2 4?"}], 0.0, 512)
            value, text = asker.ask("judge", asker.teacher, body, my_parser)
            assert value == len(text) > 0 and asker.stats["judge"]["sent"] == 1, (value, text, asker.stats)
        """, server.url)


def test_loading_and_scoring_a_reward_model_with_model_py_and_formats_py(tmp_path):
    """model.py's docstring: load_reward_model(folder).score(prompts, answers) -> one reward each."""
    from model import save_reward_model
    folder = str(tmp_path / "rm")
    save_reward_model(tiny_model(seed=0, head="linear").eval(), folder)
    out = run_copied(tmp_path, ["model.py", "formats.py"], f"""
        from model import load_reward_model
        rm = load_reward_model({folder!r})
        rewards = rm.score(["What is 2+2?", "What is 2+2?"], ["4", "5"])
        assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards), rewards
        print(rewards)
    """)
    assert out.startswith("[")
