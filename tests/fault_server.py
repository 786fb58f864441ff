"""A scriptable, fault-injecting OpenAI-compatible server for the teacher tests (127.0.0.1 only).

    server = FaultServer(latency=0.01).start()        # server.url -> "http://127.0.0.1:PORT/v1"
    server.script(status(429, retry_after="1"), status(500))   # the next requests get these faults
    server.fault = lambda body, n: ...                 # or decide per request (None = answer normally)
    ...; server.stop()

Without a fault, it answers like a well-behaved teacher, as a deterministic function of the request
(recognising the stage by the template headers of teacher.py), so reruns give identical output.
Every request body is recorded in `server.bodies`.
"""

import hashlib
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


EMPTY_CHOICES = {"status": 200, "raw": json.dumps({"id": "x", "object": "chat.completion", "choices": []})}
NOT_JSON = raw("<html>502 Bad Gateway</html>")
REFUSAL = reply(None, refusal="I can't help with that.")


def _h(text):
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def tagged(text, tag):
    """The text between <tag-NONCE> and </tag-NONCE>, and the nonce."""
    m = re.search(rf"<{tag}-(\w+)>\n(.*?)\n</{tag}-\1>", text, re.S)
    return (m.group(2), m.group(1)) if m else (None, None)


def quality(answer):
    """The simulated teacher's opinion of an answer: 'good' answers 8, 'bad' ones 3, others by hash."""
    if "good" in answer.lower():
        return 8
    if "bad" in answer.lower():
        return 3
    return 2 + _h(answer) % 8


def teacher_reply(body):
    """What a well-behaved teacher would say to this request (a deterministic function of it)."""
    messages = body["messages"]
    first, last = messages[0]["content"], messages[-1]["content"]
    json_mode = (body.get("response_format") or {}).get("type") == "json_object"
    if last.startswith("[rmd:score]"):
        return '{"score": 9}' if json_mode else "The modified answer is much better.\nScore: 9"
    if first.startswith("[rmd:annotate]"):
        s1, s2 = (quality(tagged(first, f"assistant-{k}")[0]) for k in (1, 2))
        if json_mode:
            return json.dumps({"assistant_1": s1, "assistant_2": s2})
        return f"Assistant 1 is {'better' if s1 > s2 else 'worse'}.\nAssistant 1: {s1}\nAssistant 2: {s2}"
    if first.startswith("[rmd:refine]"):
        rejected, nonce = tagged(first, "non-preferred-answer")
        return (f"[REASONING-{nonce}]\nIt lacks detail.\n[MODIFIED-ANSWER-{nonce}]\n{rejected} "
                f"Improved with detail {_h(rejected) % 100}.")
    if first.startswith("[rmd:restyle]"):
        answer, nonce = tagged(first, "answer")
        return f"[RESTYLED-ANSWER-{nonce}]\nIn other words: {answer}"
    if body.get("response_format"):
        return '{"ok": true}'
    return f"{body['model']} answer {_h(json.dumps(body, sort_keys=True)) % 10000} to: {last[:40]}"


class FaultServer:
    def __init__(self, latency=0.0, json_mode=True, fault=None):
        self.latency, self.json_mode, self.fault = latency, json_mode, fault
        self.queue, self.bodies, self.lock = deque(), [], threading.Lock()
        self.active = self.max_active = 0

    def script(self, *faults):
        self.queue.extend(faults)

    def start(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

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
                    return self.send(action["status"], None, action["raw"], action.get("headers", {}))
                content = action["content"] if "content" in action else teacher_reply(body)
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

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a killed or timed-out client: expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
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
