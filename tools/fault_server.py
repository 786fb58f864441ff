"""A scriptable, fault-injecting OpenAI-compatible server (127.0.0.1 only): a tool for anyone who builds or changes
a teacher pipeline, and what rmd's own teacher tests and bench_teacher.py run against.

It answers /v1/chat/completions like a well-behaved teacher, or with the fault you script: HTTP 429 (with or without
Retry-After) and 5xx, stalls past the client's timeout, replies drip-fed or cut mid-body, garbage and non-JSON
bodies, refusals, empty content, finish_reason "length", huge bodies. In front of another teacher it is a flaky
proxy: it forwards each request and breaks a chosen share of the replies, reproducibly.

    server = FaultServer(latency=0.01).start()        # server.url -> "http://127.0.0.1:PORT/v1"
    server.script(status(429, retry_after="1"), status(500))   # the next requests get these faults
    server.fault = lambda body, n: ...                 # or decide per request (None = answer normally)
    ...; server.stop()

Without a fault, it answers like a well-behaved teacher, as a deterministic function of the request
(read with protocol.read_request: the stage and the tagged texts, from protocol.py's own templates), so reruns
give identical output.
Every request body is recorded in `server.bodies`.

In front of another teacher (the yield benchmark, bench_teacher.py --only yield, and its test):

    url, stop = sim_server.start_server(sim.WorldConfig())
    server = FaultServer(answer=forward(url), fault=flaky(rate=0.3)).start()

`forward(url)` takes the answers from that server (any OpenAI-compatible URL); `flaky(rate)` makes each attempt of
each request (the n-th time one body arrives) faulty with probability `rate`, decided by a hash of the body and n, so
a run is reproducible whatever the timing: 429/5xx, stalls, empty content, finish_reason length,
garbage, refusals, huge bodies (`flaky(...).counts` says how many of each). yield_comparison() runs distill through
a clean and a flaky proxy on the same rows and counts what the faults cost.
"""

import hashlib
import json
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from formats import message_text
from protocol import (PROBE_REPLY, annotate_reply, read_request, refine_reply, restyle_check_reply, restyle_reply,
                      score_reply)

# -- faults: each is a dict the handler turns into a response


def status(code, retry_after=None, text='{"error": {"message": "injected"}}'):
    return {"status": code, "headers": {"Retry-After": retry_after} if retry_after else {}, "raw": text}


def sleep(seconds):
    return {"sleep": seconds}


def drip(seconds_per_byte):
    """A correct reply whose body trickles out, one byte at a time."""
    return {"drip": seconds_per_byte, "sleep": 0}


def raw(text):
    return {"status": 200, "raw": text}


def reply(content, finish_reason="stop", refusal=None):
    return {"content": content, "finish_reason": finish_reason, "refusal": refusal}


def cut():
    """The real reply cut in half, finish_reason length (max_tokens reached)."""
    return {"cut": True, "finish_reason": "length"}


EMPTY_CHOICES = {"status": 200, "raw": json.dumps({"id": "x", "object": "chat.completion", "choices": []})}
NOT_JSON = raw("<html>502 Bad Gateway</html>")
REFUSAL = reply(None, refusal="I can't help with that.")


def _h(text):
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def quality(answer):
    """The simulated teacher's opinion of an answer: 'good' answers 8, 'bad' ones 3, others by hash."""
    if "good" in answer.lower():
        return 8
    if "bad" in answer.lower():
        return 3
    return 2 + _h(answer) % 8


def teacher_reply(body):
    """What a well-behaved teacher would say to this request (a deterministic function of it), read with
    protocol.read_request and written with protocol's *_reply writers: no tag name is re-typed here."""
    stage, fields = read_request(body)
    json_mode = fields["json_mode"]
    if stage == "score":
        return score_reply(9, True) if json_mode else "The modified answer is much better.\n" + score_reply(9)
    if stage == "annotate":
        s1, s2 = quality(fields["answer_1"]), quality(fields["answer_2"])
        if json_mode:
            return annotate_reply(s1, s2, True)
        return f"Assistant 1 is {'better' if s1 > s2 else 'worse'}.\n" + annotate_reply(s1, s2)
    if stage == "refine":
        rejected = fields["non_preferred"]
        modified = f"{rejected} Improved with detail {_h(rejected) % 100}."
        return refine_reply(fields["nonce"], "It lacks detail.", modified, json_mode)
    if stage == "restyle":
        return restyle_reply(fields["nonce"], f"In other words: {fields['answer']}", json_mode)
    if stage == "restyle_check":  # the content is kept when the rewrite still holds the whole original
        return restyle_check_reply(fields["original"] in fields["rewritten"], json_mode)
    if body.get("response_format"):
        return PROBE_REPLY
    last = message_text(fields["messages"][-1])
    return f"{body['model']} answer {_h(json.dumps(body, sort_keys=True)) % 10000} to: {last[:40]}"


GARBAGE = ["NaN NaN", "\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", "\ufffd\ufffd\ufffd\ufffd", "}{ ][ ,, ;;"]


def flaky(rate=0.3, seed=0, stall=0.2, huge_chars=200_000):
    """fault(body, n) for FaultServer: the k-th arrival of each body is faulty with probability `rate`, with
    one of the kinds below, chosen by a hash of (seed, body, k) only."""
    seen, lock, counts = Counter(), threading.Lock(), Counter()
    kinds = {
        "http_429": lambda h: status(429, retry_after="0" if h % 2 else None),
        "http_5xx": lambda h: status((500, 502, 503)[h % 3]),
        "stall": lambda h: sleep(stall),
        "empty": lambda h: reply(""),
        "length": lambda h: cut(),
        "garbage": lambda h: reply(GARBAGE[h % len(GARBAGE)]),
        "refusal": lambda h: REFUSAL if h % 2 else reply("I'm sorry, but I can't help with that request."),
        "huge": lambda h: reply("lorem ipsum dolor sit amet " * (huge_chars // 27 + 1)),
    }
    names = sorted(kinds)

    def fault(body, n):
        text = json.dumps(body, sort_keys=True)
        with lock:
            k = seen[text]
            seen[text] += 1
        h = _h(f"{seed}:{k}:{text}")
        if h % 10_000 >= rate * 10_000:
            return None
        name = names[(h // 10_000) % len(names)]
        with lock:
            counts[name] += 1
        return kinds[name](h // 100_000)
    fault.counts = counts
    return fault


def forward(url, timeout=60):
    """answer(body) for FaultServer: the reply content that the chat-completions server at `url` gives."""
    import requests
    local = threading.local()

    def answer(body):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(url.rstrip("/") + "/chat/completions", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    return answer


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a killed or timed-out client: expected here


def _handler(server):
    """The request handler of FaultServer `server`: its scripted or decided fault, else its answer. (One class
    with its small methods: just over 60 lines, kept together so a fault's path reads top to bottom.)"""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once: no ~40 ms delayed-ACK wait per reply

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with server.lock:
                server.bodies.append(body)
                n = len(server.bodies)
                server.active += 1
                server.max_active = max(server.max_active, server.active)
                action = server.queue.popleft() if server.queue else None
            try:
                if action is None and server.fault:
                    action = server.fault(body, n)
                self.respond(body, action or {})
            finally:
                with server.lock:
                    server.active -= 1

        def respond(self, body, action):
            time.sleep(action.get("sleep", server.latency))
            if body.get("response_format") and not server.json_mode and "status" not in action:
                action = status(500, text='{"error": "response_format is not supported"}')
            if "status" in action:
                text = action["raw"].replace("{authorization}", self.headers.get("Authorization", ""))
                return self.send(action["status"], None, text, action.get("headers", {}))
            content = action["content"] if "content" in action else server.answer(body)
            if action.get("cut"):
                content = content[:len(content) // 2]
            message = {"role": "assistant", "content": content}
            if action.get("refusal"):
                message["refusal"] = action["refusal"]
            self.send(200, action.get("drip"), json.dumps({
                "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": message,
                             "finish_reason": action.get("finish_reason", "stop")}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}))

        def send(self, code, drip_s, text, headers=None):
            data = text.encode()
            try:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for k in range(0, len(data), 1 if drip_s else len(data) or 1):
                    self.wfile.write(data[k:k + 1] if drip_s else data)
                    self.wfile.flush()
                    time.sleep(drip_s or 0)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

    return Handler


class FaultServer:
    def __init__(self, latency=0.0, json_mode=True, fault=None, answer=teacher_reply):
        self.latency, self.json_mode, self.fault, self.answer = latency, json_mode, fault, answer
        self.queue, self.bodies, self.lock = deque(), [], threading.Lock()
        self.active = self.max_active = 0

    def script(self, *faults):
        self.queue.extend(faults)

    def start(self):
        self.httpd = _Server(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- the yield comparison: the same rows distilled through a clean and a flaky server in front of sim.py

def _outputs(out):
    import os
    read = lambda name: [json.loads(x) for x in open(os.path.join(out, name), encoding="utf-8")]  # noqa: E731
    # one refined pair per kept row; the restyle stage's extra pairs ride on it (their yield is the refined row's)
    return [r for r in read("train.jsonl") if r["provenance"]["source"] == "refined"], read("failures.jsonl")


def _pair(row):
    """What a kept pair says, without the bookkeeping of how it was obtained."""
    return {k: row[k] for k in ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "teacher_response")}


def _distill_clean_and_faulty(rows, work, rate, seed, world, overrides):
    """The same rows distilled through a clean pass-through server and through flaky(rate, seed), both in front of
    sim_server.start_server(world) -> {name: {summary, train, failures, requests, faults}}."""
    import contextlib
    import io
    import os
    import distill
    from demo import sim, sim_server
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "in.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    url, stop = sim_server.start_server(world)
    runs = {}
    try:
        for name, fault in (("clean", None), ("faulty", flaky(rate, seed, **overrides.pop("flaky", {})))):
            with FaultServer(answer=forward(url), fault=fault) as server:
                cfg = distill.DistillConfig(data=data, out=os.path.join(work, name), teacher_url=server.url,
                                            teacher_model=sim.TEACHER_MODEL, progress=False,
                                            **{"workers": 8, "backoff_base": 0.01, "backoff_max": 0.05,
                                               "timeout": 30.0, **overrides})
                with contextlib.redirect_stderr(io.StringIO()):
                    summary = distill.distill(cfg)
                train, failures = _outputs(cfg.out)
                runs[name] = {"summary": summary, "train": {r["id"]: r for r in train}, "failures": failures,
                              "requests": len(server.bodies), "faults": dict(fault.counts) if fault else {}}
    finally:
        stop()
    return runs


def yield_comparison(n_rows, work, rate=0.3, seed=0, world=None, **overrides):
    """Distill the first `n_rows` rows of sim.py's world through a clean pass-through server and through
    flaky(rate, seed), both in front of sim_server.start_server; returns a dict of counts (see bench_teacher.py
    --only yield)."""
    from demo import sim
    from formats import row_id
    world = world or sim.WorldConfig()
    rows = sim.distill_rows(world)[:n_rows]
    runs = _distill_clean_and_faulty(rows, work, rate, seed, world, overrides)
    clean, faulty = runs["clean"], runs["faulty"]
    ids = [row_id(r) for r in rows]
    accounted = [*faulty["train"], *(f["id"] for f in faulty["failures"])]
    responses = {row_id(r): r["responses"] for r in rows}
    identical = same_after_reask = invented = refused = 0
    for rid, row in faulty["train"].items():
        other = clean["train"].get(rid)
        reasked = "reasks" in row["provenance"] or (other is not None and "reasks" in other["provenance"])
        if row["rejected"] not in responses[rid]:
            invented += 1
        elif row["provenance"].get("teacher_refused") and other is not None and \
                not other["provenance"].get("teacher_refused"):
            refused += 1  # an injected refusal to a generate request: the teacher's answer y_T, kept as such
        elif other is not None and _pair(other) == _pair(row):
            identical += 1
        elif reasked:
            same_after_reask += 1
        else:
            invented += 1
    both = [rid for rid in faulty["train"] if rid in clean["train"]]
    labels_changed = sum((clean["train"][r]["rejected"], clean["train"][r]["rejected_score"]) !=
                         (faulty["train"][r]["rejected"], faulty["train"][r]["rejected_score"]) for r in both)
    reasks = {s: st.get("reasks", 0) for s, st in faulty["summary"]["stages"].items()}
    return {"rows": len(rows), "clean_kept": len(clean["train"]), "faulty_kept": len(faulty["train"]),
            "yield": len(faulty["train"]) / max(1, len(clean["train"])),
            "clean_requests": clean["requests"], "faulty_requests": faulty["requests"],
            "requests_ratio": faulty["requests"] / max(1, clean["requests"]),
            "unaccounted": len(set(ids) - set(accounted)) + (len(accounted) - len(set(accounted))),
            "identical": identical, "differ_after_reask": same_after_reask, "invented": invented,
            "teacher_refused": refused,
            "labels_changed": labels_changed, "faults": faulty["faults"], "reasks": reasks,
            "failed": {f["reason"]: sum(g["reason"] == f["reason"] for g in faulty["failures"] if not g["dropped"])
                       for f in faulty["failures"] if not f["dropped"]},
            "clean_failed": sum(not f["dropped"] for f in clean["failures"])}
