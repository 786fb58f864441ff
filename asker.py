"""asker.py: asking a teacher LLM for an answer -- a request sent exactly once, its reply parsed, a reply that is
no answer re-asked with what was wrong -- counted per stage. distill.py's stages ask through it.

Its own file because it is the piece to copy, with teacher.py (HTTP client, cache), protocol.py (parsers) and
formats.py (protocol's message helpers), to ask a teacher your own questions without the RM-Distiller pipeline:

    from asker import Asker, AskerConfig   # AskerConfig: URL, model, limits, cache, re-asks (DistillConfig extends it)
    asker = Asker(AskerConfig(teacher_url=..., teacher_model=..., out="out/x"), stages=("judge",))
    body = asker.body(asker.cfg.teacher_model, [{"role": "user", "content": question}], 0.0, 512)
    value, text = asker.ask("judge", asker.teacher, body, my_parser)   # my_parser raises ParseError: re-asked

The layers, bottom up: teacher.Client.post sends one HTTP request (retries, backoff, Retry-After); Asker.request
adds the cache (exactly once) and the counts; Asker.ask adds the parse and the re-asks (cfg.reask; cfg.retry_failed
gives cfg.reask + 1 more). A stage's last failure is a RowFailure carrying every reply. No torch.
"""
import hashlib
import os
import re
import threading
import time
from dataclasses import asdict, dataclass

from protocol import (PROBE_TEXT, REASK_LENGTH_NOTE, REASK_TEMPLATE, TEMPLATE_VERSION, ParseError, check_answer,
                      is_refusal, strip_reasoning)
from teacher import (RETRY_STATUS, Cache, Client, FatalError, RateLimiter, Reply, TransportError, bounded, chat_url,
                     reply_problem, request_key)


@dataclass
class AskerConfig:
    """How to ask a teacher: where it is, its limits, the cache, the re-asks. Asker reads these fields only;
    distill.DistillConfig extends it with the pipeline's own."""
    out: str = "out/ask"                # where the request cache goes by default: <out>/cache.jsonl
    cache: str = ""                     # request cache (a file it did not write is refused, untouched); "" = <out>/cache.jsonl
    teacher_url: str = ""               # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    teacher_model: str = ""             # the `model` field sent to the teacher
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key (the key itself is never stored)
    candidate_urls: str = ""            # comma-separated, for bare prompts; "" = teacher_url; one URL serves all models
    candidate_models: str = ""          # comma-separated candidate models; two are drawn per prompt (seeded)
    candidate_api_key_env: str = ""     # env var of the key for --candidate-urls; "" = the teacher's key only where a candidate URL is --teacher-url, no key elsewhere
    workers: int = 8                    # most requests in flight at once
    rpm: int = 0                        # requests per minute limit, 0 = unlimited
    tpm: int = 0                        # tokens per minute limit (prompt estimate + max tokens), 0 = unlimited
    timeout: float = 300.0              # seconds per HTTP request, whole reply (a slow local teacher: max tokens / tokens/s)
    max_retries: int = 5                # retries on 429, 5xx, connection errors, broken bodies (a timeout: once)
    backoff_base: float = 1.0           # first backoff in seconds, doubled per retry, with jitter
    backoff_max: float = 60.0           # backoff cap in seconds (a server's Retry-After is honoured up to 600 s)
    max_tokens_param: str = "auto"      # auto | max_tokens | max_completion_tokens (auto: the latter for api.openai.com)
    disable_thinking: bool = False      # send chat_template_kwargs {"enable_thinking": false} (vLLM, SGLang: Qwen3 etc.)
    json_mode: str = "auto"             # auto | on | off: response_format json_object for annotate/refine/score/restyle (auto: probe once)
    reask: int = 3                      # re-ask a reply that is no answer (unparseable, empty, cut, junk) N times; never a refusal of y_T
    retry_failed: bool = False          # ask again what failed, with reask + 1 more re-asks (distill: the rows in <out>/failures.jsonl)
    seed: int = 0                       # seeds of the sampled calls (distill: also pool sampling and candidate choice)


class RowFailure(Exception):
    def __init__(self, stage, reason, raw="", attempts=0, dropped=False, replies=None):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.raw, self.attempts, self.dropped = stage, reason, raw, attempts, dropped
        self.replies = replies  # every unusable reply of a re-asked stage: [{reason, chars, text}]


def _unsupported(status, text):
    """A server's definite "response_format is not supported" (llama.cpp answers 500 with such a body)."""
    return status in (400, 422) or (status == 500 and bool(
        re.search(r"response_format|json_object|json_schema|not supported|unsupported", text or "", re.I)))


ANSWER_STAGES = ("generate", "candidates")  # a model's own answer to the prompt: a refusal is an answer there


def _split(csv):
    return [x.strip() for x in csv.split(",") if x.strip()]


def candidate_key_env(cfg, url):
    """The env var whose key goes to a candidate URL: --candidate-api-key-env when given; else the teacher's for
    the teacher's own URL, and none for any other URL (often another provider: the teacher's key is not theirs)."""
    if cfg.candidate_api_key_env:
        return cfg.candidate_api_key_env
    return cfg.api_key_env if chat_url(url) == chat_url(cfg.teacher_url) else ""


def cache_key(body):
    """The cache key of a request body: teacher.request_key with this protocol's TEMPLATE_VERSION."""
    return request_key(body, TEMPLATE_VERSION)


class Asker:
    """How a run asks: the clients (one rate limit and one bound on requests in flight for all), the cache, the
    counts per stage (`stages`, and the JSON-mode probe). request() adds the cache to Client.post; ask() adds the
    parse and the re-asks."""

    def __init__(self, cfg, stages=()):
        self.cfg, self.lock = cfg, threading.Lock()
        self.cache = Cache(cfg.cache or os.path.join(cfg.out, "cache.jsonl"))
        self.stop, self.json_mode = threading.Event(), False
        limiter, slots = RateLimiter(cfg.rpm, cfg.tpm), threading.BoundedSemaphore(cfg.workers)

        def client(url, key_env):
            return Client(url, os.environ.get(key_env, ""), cfg.workers, limiter, cfg.timeout, cfg.max_retries,
                          cfg.backoff_base, cfg.backoff_max, cfg.max_tokens_param, slots)
        self.teacher = client(cfg.teacher_url, cfg.api_key_env)
        models, urls = _split(cfg.candidate_models), _split(cfg.candidate_urls) or [cfg.teacher_url]
        if len(urls) not in (1, len(models)):
            raise ValueError(f"candidate_urls has {len(urls)} URLs for {len(models)} candidate_models: give one URL, "
                             "or one per model")
        clients = {u: client(u, candidate_key_env(cfg, u)) for u in set(urls)}
        self.candidates = [(m, clients[urls[k % len(urls)]]) for k, m in enumerate(models)]
        self.clients = [self.teacher, *clients.values()]
        self.stats = {s: {"sent": 0, "replies": 0, "cache_hits": 0, "reasks": 0, "recovered": 0, "failures": {},
                          "refusals": 0, "request_s": 0.0,
                          "prompt_tokens": 0, "completion_tokens": 0, "first": None, "last": None}
                      for s in ("probe", *stages)}
        self.row_local = threading.local()  # re-asks of the row this thread is working on

    def body(self, model, messages, temperature, max_tokens, top_p=None, purpose=None, json_mode=False):
        """A chat-completions request body with the run's settings; `purpose` names a sample (its seed)."""
        body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if top_p is not None:
            body["top_p"] = top_p
        if temperature > 0 and purpose is not None:  # a seed per sample makes samples distinct cache keys
            body["seed"] = int(hashlib.sha256(f"{self.cfg.seed}:{purpose}".encode()).hexdigest()[:7], 16)
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        if self.cfg.disable_thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        return body

    def in_flight(self):
        """Requests sent and not yet answered (not rows waiting, not requests queued for a slot or backing off)."""
        return sum(c.in_flight for c in self.clients)

    def count(self, stage, **add):
        with self.lock:
            st, now = self.stats[stage], time.time()
            for k, v in add.items():
                st[k] += v
            st["first"] = st["first"] or now
            st["last"] = now

    def count_failure(self, stage, reason):
        with self.lock:
            failures = self.stats[stage]["failures"]
            failures[reason] = failures.get(reason, 0) + 1

    def request(self, stage, client, body, audit=None, **post_kw):
        """(Reply, HTTP attempts) for `body`: from the cache, or posted once (Cache.fetch) and counted. The cache
        entry keeps, beside the reply, `audit` (what the request was for: row, order, re-ask) and the stage, so
        that what the teacher said to which question can be read back; a key shared by two rows names the first."""
        def send():
            if self.stop.is_set():
                raise FatalError("run stopped")
            self.count(stage)
            timing = []
            try:
                reply, attempts = client.post(body, timing=timing, **post_kw)
            except TransportError as e:
                self.count(stage, sent=e.attempts, request_s=sum(timing))
                raise
            self.count(stage, sent=attempts, replies=1, prompt_tokens=reply.usage.get("prompt_tokens", 0),
                       completion_tokens=reply.usage.get("completion_tokens", 0), request_s=sum(timing))
            return {"stage": stage, **(audit or {}), "attempts": attempts, "seconds": round(sum(timing), 3),
                    "reply": asdict(reply)}
        entry, cached = self.cache.fetch(cache_key(body), send)
        if cached:
            self.count(stage, cache_hits=1)
        return Reply(**entry["reply"]), entry.get("attempts", 1)  # as first obtained: the same failures.jsonl

    def ask(self, stage, client, body, parse=None, *args, order=None):
        """(parse(text, *args), text) for a stage's request, text with the reasoning removed. A reply that is no
        answer, or that `parse` rejects with ParseError, is re-asked up to cfg.reask times (see reask_body), each
        attempt cached; the last failure is a RowFailure carrying every reply. HTTP-level failures were already
        retried by the client: they fail at once. `parse` None: the text only has to be an answer; for
        ANSWER_STAGES the value is (answer, refused): a refusal is the model's answer, counted, never re-asked.
        `order` (annotate: a_first/b_first; restyle: chosen/rejected) goes into the cache entry with the row."""
        replies, sent, request = [], 0, body
        audit = {"row": getattr(self.row_local, "row", None), **({"order": order} if order else {})}
        budget = self.cfg.reask + (self.cfg.reask + 1 if self.cfg.retry_failed else 0)
        for k in range(budget + 1):
            if k:
                request = self.reask_body(stage, body, replies, k)
                self.count(stage, reasks=1)
                row_reasks = getattr(self.row_local, "reasks", {})
                row_reasks[stage] = row_reasks.get(stage, 0) + 1
            try:
                reply, attempts = self.request(stage, client, request, {**audit, **({"reask": k} if k else {})})
            except TransportError as e:
                raw = self.timeout_note(body, e.attempts) if e.reason == "timeout" else e.raw
                raise RowFailure(stage, e.reason, raw, sent + e.attempts, replies=replies or None) from None
            sent += attempts
            text = strip_reasoning(reply.content)
            try:
                value = self._read(stage, reply, text, parse, *args)
            except ParseError as e:
                replies.append({"reason": e.reason, "detail": bounded(str(e), 300),
                                "chars": reply.content_chars or len(reply.content),
                                "text": bounded(reply.content or reply.refusal)})
                if e.final:
                    break
                continue
            if k:
                self.count(stage, recovered=1)
            if stage in ANSWER_STAGES and value[1]:
                self.count(stage, refusals=1)
            return value, text
        last = replies[-1]
        raise RowFailure(stage, last["reason"], last["text"], sent, replies=replies)

    @staticmethod
    def _read(stage, reply, text, parse, *args):
        """What a reply says, or ParseError: why it is no answer. For ANSWER_STAGES: (answer, refused), where a
        refusal (the text, the API's refusal field, a content filter) is the answer; only a refusal with no text
        at all is a failure, and a final one (asking again would only press the model to comply)."""
        problem = reply_problem(reply) or (None if text else "empty_reply")  # reasoning alone is no answer either
        if stage in ANSWER_STAGES and problem == "refusal":
            answer = text or strip_reasoning(reply.refusal)
            if not answer:
                raise ParseError("refusal", "a refusal with no text", final=True)
            return answer, True
        if stage in ANSWER_STAGES and problem == "length" and is_refusal(text):
            return text, True  # a refusal cut short is still one: another sample would only be a chance to comply
        if problem:
            raise ParseError(problem, "cut at the token limit" if problem == "length" else "")
        if stage in ANSWER_STAGES:
            return check_answer(text), is_refusal(text)
        if not parse:
            return text
        try:
            return parse(text, *args)
        except ParseError as e:
            if is_refusal(text):  # the one refusal rule names the reason at every stage
                raise ParseError("refusal", str(e)) from None
            raise

    def tokens_per_second(self):
        """Completion tokens per second of request time so far, all stages (None before any reply)."""
        with self.lock:
            tokens = sum(st["completion_tokens"] for st in self.stats.values())
            seconds = sum(st["request_s"] for st in self.stats.values())
        return tokens / seconds if tokens and seconds else None

    def timeout_note(self, body, attempts):
        """Why a request timed out, and what to change: a slow teacher (a local CPU server at a few tokens/s) may
        need more than --timeout seconds for max_tokens tokens; asking again would only time out again."""
        rate, cap = self.tokens_per_second(), body.get("max_tokens", 0)
        need = f"; at the {rate:.1f} tokens/s measured so far, {cap} tokens take ~{cap / rate:.0f}s" if rate else ""
        return (f"no complete reply within --timeout={self.cfg.timeout:g}s ({attempts} attempt(s)){need}: raise "
                f"--timeout, or lower this stage's max tokens (--gen-/--annotate-/--refine-/--score-max-tokens), or "
                f"--workers if the server answers one request at a time")

    def reask_body(self, stage, body, replies, k):
        """The k-th re-ask of `body`: a request that differs, so that a deterministic server does not repeat
        itself. Sampled generations get a new seed only (y_T stays an answer to the prompt alone); every other
        call keeps the conversation and adds the unusable reply and a turn that says what was wrong."""
        body = dict(body)
        if "seed" in body:
            body["seed"] = int(hashlib.sha256(f"{body['seed']}:reask:{k}".encode()).hexdigest()[:7], 16)
            if stage in ("generate", "candidates"):
                return body
        last = replies[-1]
        note = REASK_TEMPLATE.format(problem=last["detail"] or last["reason"],
                                     length_note=REASK_LENGTH_NOTE if last["reason"] == "length" else "")
        said = last["text"] or f"({last['reason']}: no content)"  # some servers refuse an empty assistant turn
        body["messages"] = list(body["messages"]) + [{"role": "assistant", "content": said},
                                                     {"role": "user", "content": note}]
        if k > 1:  # each re-ask is a new key even when the same reply comes back
            body["messages"][-1]["content"] += f" (attempt {k + 1})"
        return body

    def probe_json_mode(self):
        """Does the teacher server accept response_format json_object? Asked once, remembered in the cache."""
        if self.cfg.json_mode != "auto":
            return self.cfg.json_mode == "on"
        body = self.body(self.cfg.teacher_model, [{"role": "user", "content": PROBE_TEXT}], 0.0, 16, json_mode=True)
        key = "probe:" + cache_key(body)
        if self.cache.get(key) is None:
            try:  # retried like any request; only a definite "unsupported" answer turns JSON mode off
                self.request("probe", self.teacher, body, final=_unsupported)
                supported = True
            except TransportError as e:
                status = int(e.reason[5:]) if e.reason.startswith("http_") else None
                if status is None or (status in RETRY_STATUS and not _unsupported(status, e.raw)):
                    raise FatalError(f"the JSON-mode probe to {self.teacher.url} kept failing ({e.reason} after "
                                     f"{e.attempts} attempts): the teacher is unreachable or overloaded; retry "
                                     "later, or set --json-mode on|off to skip the probe") from None
                supported = False
            self.cache.put({"key": key, "supported": supported})
        return self.cache.get(key)["supported"]
