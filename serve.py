"""serve.py -- the HTTP reward server for RL trainers: `python rmd.py serve --model DIR [--host H] [--port N]`.

POST /get_reward (also / and /score) takes either
  - OpenRLHF's remote reward-model form: {"query": [full texts], "prompts": [...]?, "labels": [...]?}
    -> {"rewards": [...], "scores": [...], "extra_logs": {...}}. Each query is already formatted text (rendered
    prompt + response); it is tokenized as it is, trailing pad/eos text stripped and one eos id appended, as
    OpenRLHF's own serve_rm does (RewardModel.text_tokens). `prompts` and `labels` are accepted and not needed.
  - the plain form: {"prompt": p, "response": r} or {"prompts": [...], "responses": [...]} -> {"rewards": [...]};
    prompts are strings or message lists and are rendered and cut as in training (RewardModel.pieces).
Concurrent requests are micro-batched by one worker thread that owns the model. GET /health says it is up.

In Python: `url, shutdown = serve.start_server(model.load_reward_model(path))`.
"""
from __future__ import annotations

import io
import json
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cli import parse_overrides
from evaluation import load_model
from formats import DataError, UsageError

class BadRequest(ValueError):
    def __init__(self, reason, status=400):
        super().__init__(reason)
        self.status = status


def request_sequences(model, body, max_items, max_len):
    """A parsed JSON request -> ([(token ids, where the answer starts in them)], OpenRLHF form?). Raises BadRequest
    with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")

    def strings(key):
        value = body[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"'{key}' must be a list of strings")
        return value

    def check_count(n):
        if n == 0:
            raise BadRequest("nothing to score: the list is empty")
        if n > max_items:
            raise BadRequest(f"{n} items in one request; at most {max_items}", 413)

    if "query" in body:
        queries = strings("query")
        check_count(len(queries))
        sequences = [model.text_tokens(q, max_len) for q in queries]
        if model.likelihood and (missing := [i for i, (_, start) in enumerate(sequences) if start is None]):
            raise BadRequest(f"query {missing[0]}: no assistant turn found (this reward model reads the answer's "
                             "likelihood, so it needs to know where the answer starts); send the chat-formatted "
                             "prompt and response, or the plain form {\"prompt\", \"response\"}")
        return sequences, True
    if "response" in body and "prompt" in body:
        prompts, responses = [body["prompt"]], [body["response"]]
    elif "responses" in body and "prompts" in body:
        prompts, responses = body["prompts"], body["responses"]
        if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
            raise BadRequest("'prompts' and 'responses' must be lists of the same length")
    else:
        raise BadRequest("expected {\"query\": [texts]} (OpenRLHF), {\"prompt\", \"response\"} or "
                         "{\"prompts\": [...], \"responses\": [...]}")
    check_count(len(prompts))
    sequences = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(r, str):
            raise BadRequest(f"response {i} must be a string")
        try:
            prompt_ids, answer = model.pieces(p, r, max_len)
            sequences.append((prompt_ids + answer, len(prompt_ids)))
        except DataError as e:
            raise BadRequest(f"prompt {i}: {str(e).split(': ', 1)[-1]}") from None
    return sequences, False


class Scorer:
    """One worker thread owns the model; requests queue up and are scored together (micro-batching)."""

    def __init__(self, model, batch_size=32, max_batch_items=512):
        self.model, self.batch_size, self.max_batch_items = model, batch_size, max_batch_items
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()

    def score(self, sequences):
        job = {"sequences": sequences, "done": threading.Event()}
        self.jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["rewards"]

    def work(self):
        while True:
            jobs = [self.jobs.get()]
            if jobs[0] is None:
                return
            total = len(jobs[0]["sequences"])
            while total < self.max_batch_items:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                jobs.append(job)
                total += len(job["sequences"])
            try:
                sequences = [s for j in jobs for s in j["sequences"]]
                starts = [start for _, start in sequences] if self.model.likelihood else None
                rewards = self.model.sequence_rewards([ids for ids, _ in sequences], self.batch_size, "right", starts)
                k = 0
                for job in jobs:
                    job["rewards"] = rewards[k:k + len(job["sequences"])]
                    k += len(job["sequences"])
            except Exception as e:  # noqa: BLE001 - reported to every waiting request as a 500
                for job in jobs:
                    job["error"] = e
            for job in jobs:
                job["done"].set()

    def close(self):
        self.jobs.put(None)

class DeadlineReader(io.RawIOBase):
    """A connection's reads: each waits at most idle_timeout, and while a deadline is set (a request line and its
    headers are being read), none goes past it. Per-read timeouts alone let a client that drips a byte now and then
    hold its connection, and its slot, for ever."""

    def __init__(self, sock, idle_timeout):
        self.sock, self.idle_timeout, self.deadline = sock, idle_timeout, None

    def readable(self):
        return True

    def readinto(self, buffer):
        timeout = self.idle_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request line and headers took too long")
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle_timeout)  # what the writes of the reply get


class RewardHandler(BaseHTTPRequestHandler):
    """One HTTP connection; the settings and the scorer are the server's (RewardServer)."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once: no ~40 ms delayed-ACK wait per reply

    @property
    def timeout(self):  # socket timeout for every read: a half-sent request cannot hold a thread for good
        return self.server.idle_timeout

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket stays open; reads go through the deadline instead
        self.reader = DeadlineReader(self.connection, self.server.idle_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        # from when the connection is ready for a request (just opened, or the last reply sent) to its last header
        self.reader.deadline = time.monotonic() + self.server.head_timeout
        super().handle_one_request()

    def parse_request(self):
        try:
            return super().parse_request()  # reads the headers
        finally:
            self.reader.deadline = None  # the body has read_body's deadline

    def reply(self, status, payload, headers=()):
        if self.request_version == "HTTP/0.9":  # a garbage request line: the reply still gets a status line
            self.request_version, self.close_connection = "HTTP/1.0", True
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The standard library's HTML error pages (bad request line, unknown method...) as JSON."""
        self.close_connection = True
        if code == 501:  # a method nobody implements here
            return self.not_allowed()
        self.reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def not_allowed(self):
        self.close_connection = True  # a body may follow, unread
        self.reply(405, {"error": f"method {self.command} not allowed; POST /get_reward or /score, GET /health"},
                   headers=[("Allow", "GET, POST")])

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = not_allowed

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            return self.reply(200, {"status": "ok"})
        if self.path.split("?")[0] in ("/", "/get_reward", "/score"):
            return self.reply(405, {"error": f"{self.path} takes POST with a JSON body"})
        self.reply(404, {"error": f"unknown path {self.path}; POST /get_reward, GET /health"})

    def do_POST(self):
        try:
            self.post()
        except (socket.timeout, ConnectionError):
            self.close_connection = True  # the client stalled or left: nobody to answer
        except Exception as e:  # noqa: BLE001 - answer every request, never just drop the connection
            self.close_connection = True
            self.reply(500, {"error": f"internal error: {type(e).__name__}"})

    def body_length(self):
        """The declared body length, or an error reply (then the body is never read)."""
        if self.headers.get("Transfer-Encoding"):
            return None, (411, "chunked bodies are not accepted; send a Content-Length header")
        if len(self.headers.get_all("Content-Length") or []) > 1:  # which one frames the body is ambiguous
            return None, (400, "more than one Content-Length header")
        value = self.headers.get("Content-Length")
        if value is None:
            return None, (411, "a Content-Length header is required")
        if not re.fullmatch(r"[0-9]{1,15}", value.strip()):
            return None, (400, f"invalid Content-Length {value[:40]!r}")
        length = int(value)
        if length > self.server.max_body:
            return None, (413, f"request body of {length} bytes; at most {self.server.max_body}")
        return length, None

    def read_body(self, length):
        """Exactly `length` bytes, under an overall deadline (a client may drip them)."""
        deadline, chunks, left = time.monotonic() + 4 * self.server.idle_timeout, [], length
        while left:
            chunk = self.rfile.read1(min(left, 1 << 16))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            chunks.append(chunk)
            left -= len(chunk)
            if time.monotonic() > deadline:
                raise socket.timeout("request body too slow")
        return b"".join(chunks)

    def post(self):
        length, problem = self.body_length()
        if problem:
            self.close_connection = True  # the unread body would be taken for the next request
            return self.reply(problem[0], {"error": problem[1]})
        if self.path.split("?")[0] not in ("/", "/get_reward", "/score"):
            self.read_body(length)
            return self.reply(404, {"error": f"unknown path {self.path}; POST /get_reward or /score"})
        try:
            body = json.loads(self.read_body(length))
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") fail here
        except (ValueError, UnicodeError) as e:
            return self.reply(400, {"error": f"request body is not valid JSON text: {str(e)[:200]}"})
        except RecursionError:
            return self.reply(400, {"error": "request body is nested too deeply"})
        try:
            sequences, openrlhf = request_sequences(self.server.model, body, self.server.max_items,
                                                          self.server.max_len)
        except BadRequest as e:
            return self.reply(e.status, {"error": str(e)})
        try:
            rewards = self.server.scorer.score(sequences)
        except Exception as e:  # noqa: BLE001
            return self.reply(500, {"error": f"scoring failed: {type(e).__name__}: {e}"})
        if openrlhf:
            return self.reply(200, {"rewards": rewards, "scores": rewards, "extra_logs": {"reward": rewards}})
        self.reply(200, {"rewards": rewards})

    def log_message(self, *args):
        pass


class RewardServer(ThreadingHTTPServer):
    """Serves RewardHandler connections, at most max_connections at once (more get a 503 and are closed); holds the
    settings the handler reads."""
    daemon_threads = True

    def __init__(self, address, scorer, max_items, max_body, max_len, idle_timeout, max_connections, head_timeout):
        self.request_queue_size = max_connections  # the listen backlog (the default 5 drops bursts of connections)
        super().__init__(address, RewardHandler)
        self.scorer, self.model, self.max_items, self.max_body = scorer, scorer.model, max_items, max_body
        self.max_len, self.idle_timeout, self.head_timeout = max_len, idle_timeout, head_timeout
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):  # over the bound: answer at once, without a thread
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 40\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                                b'{"error": "too many connections, retry"}')
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        pass  # a client that vanished mid-request


def start_server(model, host="127.0.0.1", port=0, batch_size=32, max_items=256, max_body=8 << 20, max_len=0,
                 idle_timeout=30.0, max_connections=64, head_timeout=10.0):
    """Serve in a background thread -> (url, shutdown function). A request's line and headers must be in within
    head_timeout seconds of the connection being ready for it (opened, or the last reply sent), or the connection
    is closed; its body within idle_timeout per read and 4 x idle_timeout in all. At most max_connections are served
    at once (more get a 503 and are closed; as many again wait in the listen backlog)."""
    scorer = Scorer(model, batch_size)
    max_len = max_len or model.max_len
    try:
        server = RewardServer((host, port), scorer, max_items, max_body, max_len, idle_timeout, max_connections,
                              head_timeout)
    except OSError:
        scorer.close()
        raise
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def shutdown():
        server.shutdown()
        server.server_close()
        scorer.close()

    return f"http://{server.server_address[0]}:{server.server_address[1]}", shutdown


@dataclass
class ServeConfig:
    model: str = ""  # a folder written by `rmd.py train` (its model/ subfolder)
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines
    port: int = 5000  # TCP port
    batch_size: int = 32  # sequences per forward pass
    max_items: int = 256  # sequences per request (more: 413)
    max_body_mb: float = 8.0  # request body size limit in MiB (more: 413)
    max_len: int = 0  # tokens per sequence (0 = the model's training max_len)
    idle_timeout: float = 30.0  # seconds one read may wait mid-request (a body must also arrive within 4x this)
    head_timeout: float = 10.0  # seconds from a connection being ready for a request (opened, or the last reply sent) to its last header: idle or dripping clients are cut off
    max_connections: int = 64  # connections served at once (and the listen backlog); more get 503
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...


def serve_command(argv):
    cfg = parse_overrides(ServeConfig(), argv, "python rmd.py serve", "HTTP reward server: POST /get_reward "
                          "(OpenRLHF --remote_rm_url) or /score; GET /health.")
    model = load_model("serve", cfg)
    try:
        url, shutdown = start_server(model, cfg.host, cfg.port, cfg.batch_size, cfg.max_items,
                                     int(cfg.max_body_mb * (1 << 20)), cfg.max_len, cfg.idle_timeout,
                                     cfg.max_connections, cfg.head_timeout)
    except OSError as e:
        raise UsageError(f"cannot serve on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    print(f"reward server at {url}/get_reward (OpenRLHF --remote_rm_url) and {url}/score", file=sys.stderr)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shutdown()
