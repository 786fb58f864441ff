"""sim_server.py -- the simulated teacher (sim.py's world) served over the OpenAI chat-completions API.

It reads exactly the requests distill.py sends, with protocol.read_request (the same templates: no tag name is
re-typed here), answers with the world's teacher behaviours and candidate models, and writes its replies with
protocol's *_reply writers. The command line (`python rmd.py teacher-sim`, `python -m demo.sim_server`) also
writes the world's data and measures its teacher:

    python rmd.py teacher-sim --port=8000            # serve it (Ctrl-C stops); --help lists every option
    python rmd.py teacher-sim --write-data=data/builtin   # distill input, eval splits and best-of-N set
    python rmd.py teacher-sim --stats                # the teacher's biases against the published figures

    from demo import sim, sim_server
    url, stop = sim_server.start_server(sim.WorldConfig(), port=0)   # loopback, background thread
"""

if not __package__:  # run as a file: the repository's modules are importable only from its root
    raise SystemExit("error: run it from the repository root as a module: python -m demo.sim_server")

import dataclasses
import hashlib
import json
import random
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cli import one_line_errors, parse_overrides
from demo import sim
from demo.sim import CANDIDATE_MODELS, TEACHER_MODEL, WORLD_STYLE, WorldConfig, task_from_prompt
from formats import message_text
from protocol import (PROBE_REPLY, annotate_reply, read_request, refine_reply, restyle_check_reply, restyle_reply,
                      score_reply)

# What real teachers say instead of an answer, or around one (seen from llama.cpp models: tests/fixtures).
REFUSAL = "I'm sorry, but I can't help with that request."
LEAD_IN, NOTE = "The modified answer, with the problems fixed, would be:", "Note: I kept the original wording."


# -----------------------------------------------------------------------------
# replies


def reply_for(body, cfg):
    """The sim teacher's reply text to one chat-completions request body (a dict). Deterministic: the rng is
    seeded by the world seed and the request itself."""
    stage, fields = read_request(body)
    # A re-ask gets the judgement of the request before it (greedy decoding: the same verdict), but its own
    # chance of ignoring the format again; a re-ask with a new seed (sampled stages) is a new sample.
    format_digest = hashlib.sha256(json.dumps([cfg.seed, body], sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps([cfg.seed, {**body, "messages": fields["messages"]}],
                                       sort_keys=True).encode()).hexdigest()
    rng = random.Random(digest)
    format_rng = rng if digest == format_digest else random.Random(format_digest)
    if stage == "probe":
        return PROBE_REPLY
    if stage == "generate":
        return _generate(body, fields, cfg, rng)
    task = task_from_prompt(fields["question"])
    if stage == "annotate":
        return _annotate(task, fields, cfg, rng, format_rng)
    if stage == "refine":
        if task is None:
            diagnosis, refined = "The question is outside what I can check; I keep the preferred answer.", \
                fields["preferred"]
        else:
            diagnosis, refined = sim.teacher_refine(task, fields["non_preferred"], cfg, rng)
        return refine_reply(fields["nonce"], diagnosis, _commented(refined, cfg, format_rng), fields["json_mode"])
    if stage == "score":
        anchor = fields["rejected_score"]
        if task is None:
            s = int(min(10, max(1, round(anchor + rng.gauss(0.0, cfg.rescore_noise)))))
        else:
            s = sim.teacher_rescore(task, anchor, fields["non_preferred"], fields["modified"], cfg, rng)
        return score_reply(s, fields["json_mode"])
    if stage == "restyle_check":
        same = sim.teacher_check(task, fields["original"], fields["rewritten"], cfg, rng)
        return restyle_check_reply(same, fields["json_mode"])
    answer = fields["answer"]  # restyle
    restyled = answer if task is None else sim.teacher_restyle(task, answer, WORLD_STYLE[fields["style"]], cfg, rng)
    return restyle_reply(fields["nonce"], _commented(restyled, cfg, format_rng), fields["json_mode"])


def _commented(answer, cfg, rng):
    """The answer as a teacher may hand it back: now and then (cfg.commentary_rate) inside its own comments."""
    if cfg.commentary_rate and rng.random() < cfg.commentary_rate:
        return f"{LEAD_IN}\n{answer}\n\n{NOTE}"
    return answer


def _annotate(task, fields, cfg, rng, format_rng):
    s1, s2 = sim.teacher_judge(task, fields["answer_1"], fields["answer_2"], cfg, rng, avoid_tie=fields["tie_reask"])
    if format_rng.random() < cfg.malformed_rate:  # the format ignored, as judges now and then do
        return rng.choice([f"Both assistants answer the question. Assistant {1 if s1 >= s2 else 2} is better.",
                           f"Assistant 1 gets {s1}", f"Scores: {s1}/10 and {s2}/10."])
    return annotate_reply(s1, s2, fields["json_mode"])


def _generate(body, fields, cfg, rng):
    """The prompt's own messages: the teacher's answer, or a candidate model's when `model` names one."""
    task = task_from_prompt(fields["question"])
    if task is None:
        return "I can only answer the built-in world's questions (arithmetic, capitals, spelling)."
    model = body.get("model", TEACHER_MODEL)
    if model in CANDIDATE_MODELS:
        return sim.candidate_answer(task, CANDIDATE_MODELS.index(model), cfg, rng)[0]
    if cfg.refusal_rate and random.Random(f"{cfg.seed}:refuse:{fields['question']}").random() < cfg.refusal_rate:
        return REFUSAL  # decided per prompt, as a real teacher's policy is: a new sample refuses again
    return sim.teacher_generate(task, cfg, rng)


# -----------------------------------------------------------------------------
# the HTTP server


def make_handler(cfg):
    first_tries, lock = set(), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once: no ~40 ms delayed-ACK wait per reply

        def log_message(self, *args):  # quiet: a distill run sends thousands of requests
            pass

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                return self._send(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "owned_by": "rmd-sim"} for m in (TEACHER_MODEL,) + CANDIDATE_MODELS]})
            if self.path.rstrip("/") in ("/health", "/v1/health"):
                return self._send(200, {"status": "ok"})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
                if cfg.http_error_rate > 0:
                    key = hashlib.sha256(raw).hexdigest()
                    with lock:
                        first = key not in first_tries
                        first_tries.add(key)
                    if first and random.Random(key).random() < cfg.http_error_rate:
                        code = random.Random(key + "code").choice([429, 500])
                        return self._send(code, {"error": {"message": "simulated overload", "type": "server_error"}})
                content = reply_for(body, cfg)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                return self._send(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
            prompt_chars = sum(len(message_text(m)) for m in body.get("messages", []))
            self._send(200, {
                "id": "chatcmpl-" + hashlib.sha256(raw).hexdigest()[:24], "object": "chat.completion",
                "created": 0, "model": body.get("model", TEACHER_MODEL),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(content) // 4 + 1,
                          "total_tokens": prompt_chars // 4 + len(content) // 4 + 2}})

    return Handler


def start_server(cfg=None, port=0, host="127.0.0.1"):
    """Serve the sim teacher in a background thread. Returns (base_url ending in /v1, shutdown function)."""
    server = ThreadingHTTPServer((host, port), make_handler(cfg or WorldConfig()))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="rmd-sim-teacher")
    thread.start()

    def shutdown():
        server.shutdown()
        server.server_close()
        thread.join()
    return f"http://{host}:{server.server_address[1]}/v1", shutdown


# -----------------------------------------------------------------------------
# command line


@dataclass
class SimConfig(WorldConfig):
    """The world's options (WorldConfig) and what the command does with it."""
    port: int = 8000         # port to serve on (0: any free port)
    host: str = "127.0.0.1"  # address to serve on (loopback by default: nothing outside this machine reaches it)
    write_data: str = ""     # a folder: write the distill input, eval splits and best-of-N set there, and exit
    stats: bool = False      # print the teacher's measured biases (and accuracy as a judge), and exit


ABOUT = "The simulated teacher: serve it (OpenAI-compatible, until Ctrl-C), write its world's data, or measure it."


def main(argv=None, prog="python -m demo.sim_server"):
    cfg = parse_overrides(SimConfig(), list(sys.argv[1:] if argv is None else argv), prog, ABOUT)
    world = WorldConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(WorldConfig)})
    try:
        world.skill_list()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.stats:
        stats = sim.bias_stats(world)
        for split in ("normal", "hard"):
            stats[f"teacher_accuracy_{split}"] = sim.teacher_judge_accuracy(sim.eval_pairs(world, split), world)
        print(json.dumps(stats, indent=1))
        return 0
    if cfg.write_data:
        for name, path in sim.write_builtin_data(cfg.write_data, world).items():
            print(f"{name}: {path}")
        return 0
    url, shutdown = start_server(world, port=cfg.port, host=cfg.host)
    print(f"sim teacher serving at {url} (models: {TEACHER_MODEL}, {', '.join(CANDIDATE_MODELS)}); Ctrl-C stops",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shutdown()
    return 0


if __name__ == "__main__":
    with one_line_errors():
        sys.exit(main())
