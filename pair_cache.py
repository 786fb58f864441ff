"""pair_cache.py -- tokenize a data file once into flat token arrays on disk; every process maps them.

    store, counts = pair_cache.load("pairs.jsonl", tokenizer, max_len, cache_dir="out/token_cache")
    store[i]          # -> batches.Example, read from the memory-mapped arrays on demand
    store[a:b], store.take(indices), len(store), store.column("margin")

A data file's cache is a folder <cache_dir>/<key>/: tokens.bin (each pair's prompt as kept by its longest row, then
its chosen, rejected and teacher answers, all cut by model.fit; uint16 when the vocabulary fits, else int32), one
.bin per pair column (COLUMNS) and meta.json (the dtypes, how many rows were read and why some were dropped). Every
row is stored in file order; one that is no pair (DROPS: its two sequences are the same) is marked in the column
drop, and load leaves it out unless keep_dropped (eval scores it as a tie). The key covers what decides the
contents: the file's bytes (sha256), the tokenizer, max_len, the column renames and the source of the parsing,
rendering and cutting rules (formats.py, model.py's tokenization functions, this builder), so an edited file or rule
gets a new folder and never a stale one. A file's sha256 is remembered under <cache_dir>/file_digests/ with its
stamp (device, inode, size, mtime and ctime: every write moves the ctime, and no call sets it back), so a rerun
reads the file again only after it was written to (remembered_digest). One process builds it (in a temporary folder,
then one rename, under an flock on <key>.lock): the other DDP ranks and concurrent runs wait, then map the same
files; reruns and --resume map it at once. Building streams the file in chunks of CHUNK rows through the fast
tokenizer's batch call, in `workers` processes when the file is large, so memory stays bounded. The rendered prompt
and each rendered answer are tokenized on their own, as model.RewardModel.pieces scores them (a sequence is
ids(prompt) + ids(answer) + eos, never the ids of the joined text), so each distinct prompt and answer of a chunk is
tokenized once however many pairs share it (encode_distinct); a training run keeps only a few numbers per pair in
memory (store.column reads a whole column with a plain read, not the map, for the epoch order), and the map's pages
are the kernel's page cache, shared by every rank on the machine. With cache_dir=None the same arrays are built in
memory (small files, tests, Hub datasets).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

import files
import formats
import model
from formats import DataError, parse_row, read_source_rows

CHUNK = 2048  # rows per tokenizer batch call (and per worker task)
PARALLEL_BYTES = 64 << 20  # files at least this large are tokenized in worker processes
CUTS = (None,) + model.CUT_KINDS  # fit()'s cut kinds, stored as their index here
COLUMNS = {  # one value per kept pair
    "start": "<i8",  # where its tokens start in tokens.bin
    "prompt": "<i4",  # prompt tokens stored: the longest of the kept prompts (each row keeps the prompt's end)
    "kept_chosen": "<i4", "kept_rejected": "<i4", "kept_teacher": "<i4",  # each row's kept prompt (-1: no teacher)
    "chosen": "<i4", "rejected": "<i4", "teacher": "<i4",  # answer tokens after cutting (-1: no teacher answer)
    "prompt_len": "<i4",  # tokens of the whole rendered prompt, before cutting
    "cut_chosen": "<i1", "cut_rejected": "<i1", "cut_teacher": "<i1",  # index into CUTS
    "margin": "<f8",  # the teacher's score gap; NaN when the row has none
    "file": "<i2",  # which of the data files it came from (meta.json's "paths")
    "line": "<i8",  # the row's line in that file (for error messages)
    "teacher_field": "<i1",  # 1 when the row has a teacher_response field (the missing-margin error's advice)
    "drop": "<i1",  # 0: a pair; k: no pair, for the reason DROPS[k - 1] (training leaves it out; eval: a tie)
}
DROPS = ("chosen == rejected", "identical after cutting to max_len")  # rows whose two sequences are the same


@dataclass
class Example:
    """One tokenized pair, as every command cuts it (model.fit)."""
    prompt: tuple  # (prompt ids of the chosen row, of the rejected row): cut to fit each row
    chosen: list  # answer token ids, eos included unless the answer's end was cut
    rejected: list
    margin: float | None
    teacher: tuple | None  # (prompt ids, teacher answer ids): the LM target
    prompt_len: int = 0  # tokens of the whole rendered prompt, before cutting
    cuts: tuple = (None, None, None)  # fit()'s cut kind of the chosen, rejected and teacher-answer sequence


@dataclass
class Counts:
    """What building read: rows, and the rows dropped by reason (a pair whose answers are equal is no pair)."""
    rows: int
    dropped: dict


# ----------------------------------------------------------------------------------------------------------------
# tokenizing a chunk of rows


def encode_batch(tokenizer, texts):
    """model.encode of many texts in one call: the same ids as one by one. A fast tokenizer without truncation or
    padding set is called directly (its Rust batch path, without offsets or the per-text Python dicts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None and texts:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return [model.encode(tokenizer, text) for text in texts]


def encode_distinct(tokenizer, texts):
    """encode_batch of texts, each distinct text tokenized once (several pairs of one prompt, a repeated answer) ->
    the ids of every text, in order (a repeated text's ids are one list: read it, never change it)."""
    index = {}
    for text in texts:
        index.setdefault(text, len(index))
    ids = encode_batch(tokenizer, list(index))
    return [ids[index[text]] for text in texts]


def render_prompts(tokenizer, prompts):
    """model.render_prompt of each prompt (a message list), rendered once per distinct prompt."""
    rendered, out = {}, []
    for messages in prompts:
        key = tuple((m["role"], m["content"]) for m in messages)
        if key not in rendered:
            rendered[key] = model.render_prompt(tokenizer, messages)
        out.append(rendered[key])
    return out


def tokenize_chunk(rows, tokenizer, max_len, path, file=0, keys=None):
    """[(line_no, row or its JSONL text)] -> (tokens: list of ids, {column: list}, {reason: dropped rows}), each
    row's sequences cut by model.fit as every command cuts them; a row that is no pair (DROPS) is stored too, marked
    in the drop column. A bad row raises DataError naming path:line."""
    try:
        rows = [(line, formats.jsonl_row(path, line, row, keys) if isinstance(row, str) else row) for line, row in rows]
    except ValueError as e:
        raise DataError(str(e)) from None
    parsed = [(line, parse_row(row, f"{path}:{line}"), "teacher_response" in row) for line, row in rows]
    texts = render_prompts(tokenizer, [p[0] for _, p, _ in parsed])
    for part in (1, 2, 4):  # chosen, rejected, teacher answers
        texts += [model.render_answer(tokenizer, p[part]) for _, p, _ in parsed if part < 4 or has_teacher(p)]
    ids, n = encode_distinct(tokenizer, texts), len(parsed)
    eos = [tokenizer.eos_token_id]
    teacher_ids = iter(ids[3 * n:])
    tokens, columns, dropped = [], {name: [] for name in COLUMNS}, {}
    for k, (line, p, teacher_field) in enumerate(parsed):
        prompt, chosen, rejected = ids[k], ids[n + k] + eos, ids[2 * n + k] + eos
        teacher = next(teacher_ids) + eos if has_teacher(p) else None
        drop = DROPS[0] if chosen == rejected else None
        p_c, chosen, cut_c = model.fit(prompt, chosen, max_len)
        p_r, rejected, cut_r = model.fit(prompt, rejected, max_len)
        if drop is None and p_c + chosen == p_r + rejected:
            drop = DROPS[1]
        if drop is not None:
            dropped[drop] = dropped.get(drop, 0) + 1
        p_t, cut_t = [], None
        if teacher is not None:
            p_t, teacher, cut_t = model.fit(prompt, teacher, max_len)
        kept = max(len(p_c), len(p_r), len(p_t))
        row = {"start": len(tokens), "prompt": kept, "kept_chosen": len(p_c), "kept_rejected": len(p_r),
               "kept_teacher": len(p_t) if teacher is not None else -1, "chosen": len(chosen),
               "rejected": len(rejected), "teacher": len(teacher) if teacher is not None else -1,
               "prompt_len": len(prompt), "cut_chosen": CUTS.index(cut_c), "cut_rejected": CUTS.index(cut_r),
               "cut_teacher": CUTS.index(cut_t), "margin": math.nan if p[3] is None else p[3], "file": file,
               "line": line, "teacher_field": int(teacher_field), "drop": 0 if drop is None else 1 + DROPS.index(drop)}
        for name, value in row.items():
            columns[name].append(value)
        tokens += prompt[len(prompt) - kept:] + chosen + rejected + (teacher or [])
    return tokens, columns, dropped


def has_teacher(parsed):
    return bool(parsed[4] and parsed[4].strip())


# ----------------------------------------------------------------------------------------------------------------
# building: rows -> arrays (in memory or in a folder)


def token_dtype(tokenizer):
    vocab = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    return "<u2" if max(vocab, len(tokenizer) if hasattr(tokenizer, "__len__") else 0) <= 1 << 16 else "<i4"


class Sink:
    """Where built chunks go: appended to the files of `folder`, or kept in memory (folder None)."""

    def __init__(self, folder, dtype):
        self.folder, self.dtype, self.pairs, self.tokens = folder, dtype, 0, 0
        self.parts = {name: [] for name in ("tokens", *COLUMNS)}
        self.files = {name: open(os.path.join(folder, name + ".bin"), "wb") for name in self.parts} if folder else {}

    def add(self, tokens, columns):
        columns = dict(columns, start=[s + self.tokens for s in columns["start"]])
        arrays = {"tokens": np.asarray(tokens, dtype=self.dtype),
                  **{name: np.asarray(columns[name], dtype=dtype) for name, dtype in COLUMNS.items()}}
        for name, array in arrays.items():
            if self.folder:
                array.tofile(self.files[name])
            else:
                self.parts[name].append(array)
        self.pairs, self.tokens = self.pairs + len(columns["start"]), self.tokens + len(tokens)

    def close(self):
        for f in self.files.values():
            f.close()
        if self.folder:
            return None
        dtypes = {"tokens": self.dtype, **COLUMNS}
        return {name: np.concatenate(parts) if parts else np.zeros(0, dtypes[name]) for name, parts in
                self.parts.items()}


def chunks(path, keys):
    """The rows of a data file in lists of CHUNK (line_no, row); a JSONL file's rows as their text, streamed (the
    worker that tokenizes a chunk parses it: formats.jsonl_row)."""
    chunk = []
    try:
        for item in read_source_rows(path, keys, raw=True):
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    except ValueError as e:
        raise DataError(str(e)) from None
    if chunk:
        yield chunk


_WORKER = {}  # the tokenizer and settings of a worker process (set before the fork)


def _one_thread():
    """A worker's tokenizer runs on one thread (the workers are the parallelism; no fork warning either)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _work(task):
    file, chunk = task
    return tokenize_chunk(chunk, _WORKER["tokenizer"], _WORKER["max_len"], _WORKER["paths"][file], file,
                          _WORKER["keys"])


def build(paths, tokenizer, max_len, keys, folder, workers):
    """Tokenize every row of the data files `paths` -> (arrays, or None when written to folder; Counts; meta)."""
    dtype = token_dtype(tokenizer)
    sink, counts = Sink(folder, dtype), Counts(0, {})
    tasks = ((file, chunk) for file, path in enumerate(paths) for chunk in chunks(path, keys))
    local = [p for p in paths if not p.startswith(formats.HUB_PREFIX)]
    parallel = workers > 1 and sum(map(os.path.getsize, local)) >= PARALLEL_BYTES
    with contextlib.ExitStack() as stack:
        results = (tokenize_chunk(chunk, tokenizer, max_len, paths[file], file, keys) for file, chunk in tasks)
        if parallel:  # fork: the workers inherit the tokenizer; the parent reads and writes, they parse and tokenize
            _WORKER.update(tokenizer=tokenizer, max_len=max_len, paths=paths, keys=keys)
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, _one_thread))
            results = pool.imap(_work, tasks)
        for tokens, columns, dropped in results:
            counts.rows += len(columns["start"])
            for reason, n in dropped.items():
                counts.dropped[reason] = counts.dropped.get(reason, 0) + n
            sink.add(tokens, columns)
    arrays = sink.close()
    meta = {"paths": paths, "pairs": sink.pairs, "tokens": sink.tokens, "token_dtype": dtype, "columns": COLUMNS,
            "rows": counts.rows, "dropped": counts.dropped, "max_len": max_len}
    return arrays, counts, meta


# ----------------------------------------------------------------------------------------------------------------
# the key and the folder


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


DIGESTS = "file_digests"  # <cache_dir>/file_digests/: each data file's sha256 and the stamp it was taken at
RACY_NS = 2 * 10**9  # a file changed less than this long ago is not recorded (its next change could keep the stamp)
clock = time.time_ns  # the wall clock of the racy rule (tests set it)


def file_stamp(path):
    """What every write to a file changes: device, inode, size, mtime and ctime (ns). A write that keeps the size
    and sets the mtime back still moves the ctime, which no call sets back."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def remembered_digest(path, cache_dir):
    """file_digest(path), hashed only when the file's stamp (file_stamp) differs from the one recorded beside the
    digest under <cache_dir>/file_digests/ (so that a rerun does not read the whole file). The record is written
    only when the file's ctime is RACY_NS old: a write within the same tick of the kernel's coarse clock could
    otherwise keep the stamp (git's "racy clean" problem)."""
    record = os.path.join(cache_dir, DIGESTS, hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:20])
    stamp = file_stamp(path)
    with contextlib.suppress(OSError, ValueError):
        with open(record) as f:
            known = json.load(f)
        if known["stamp"] == stamp:
            return known["sha256"]
    digest = file_digest(path)
    if file_stamp(path) == stamp and clock() - stamp[4] >= RACY_NS:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        tmp = f"{record}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"path": os.path.realpath(path), "stamp": stamp, "sha256": digest}, f)
        os.replace(tmp, record)  # concurrent ranks write the same record: one whole file wins
    return digest


def tokenizer_fingerprint(tokenizer):
    """What decides a tokenizer's ids and rendering: its vocabulary and rules (the fast tokenizer's JSON), its chat
    template and eos id."""
    if isinstance(tokenizer, model.ByteTokenizer):
        return "bytes"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, rules, tokenizer.chat_template,
                                      tokenizer.eos_token_id]).encode()).hexdigest()


RULES = (model.encode, model.render_prompt, model.render_answer, model.prompt_floor, model.fit, encode_batch,
         encode_distinct, render_prompts, tokenize_chunk, Sink.add)


def token_cache_key(paths, tokenizer, max_len, keys, cache_dir=None):
    """The folder name of the cache of data files (see the module docstring for what it covers). cache_dir: the
    files' digests are remembered there (remembered_digest)."""
    h = hashlib.sha256()
    with open(formats.__file__, "rb") as f:
        h.update(f.read())
    digests = [remembered_digest(p, cache_dir) if cache_dir else file_digest(p) for p in paths]
    for part in [*digests, tokenizer_fingerprint(tokenizer), json.dumps([max_len, keys or {}]),
                 *(inspect.getsource(rule) for rule in RULES)]:
        h.update(part.encode())
    return h.hexdigest()[:20]


def load(paths, tokenizer, max_len, cache_dir=None, keys=None, workers=None, log=None, keep_dropped=False):
    """Data files -> (PairStore of their tokenized pairs, Counts). cache_dir: build the cache once and map it (local
    files; with a Hub dataset among them, built in memory); None: build in memory. workers: processes that
    tokenize large files (default: the usable cores). keep_dropped: every row in file order, the rows that are no
    pair (DROPS, marked in the column "drop") included."""
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    workers = workers or len(os.sched_getaffinity(0))
    for path in paths:
        problem = formats.source_problem(path)
        if problem:
            raise DataError(problem)
    if cache_dir is None or any(p.startswith(formats.HUB_PREFIX) for p in paths):
        arrays, counts, meta = build(paths, tokenizer, max_len, keys, None, 1)
        return pairs_only(PairStore(arrays, meta, None), keep_dropped), counts
    stamps = [file_stamp(p) for p in paths]  # before hashing: write() checks that the files kept them
    folder = os.path.join(cache_dir, token_cache_key(paths, tokenizer, max_len, keys, cache_dir))
    if not os.path.exists(os.path.join(folder, "meta.json")):
        def waiting(pid):
            log(f"[pair_cache] process {pid} is tokenizing into {folder}; waiting for it")
        with files.build_lock(folder, waiting):
            if not os.path.exists(os.path.join(folder, "meta.json")):
                write(folder, paths, tokenizer, max_len, keys, workers, log, stamps)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return pairs_only(PairStore(None, meta, folder), keep_dropped), Counts(meta["rows"], meta["dropped"])


def pairs_only(store, keep_dropped):
    """The store without its rows that are no pair (unless keep_dropped)."""
    if keep_dropped or not any(store.meta["dropped"].values()):
        return store
    return store.take(np.flatnonzero(store.column("drop") == 0))


def write(folder, paths, tokenizer, max_len, keys, workers, log, stamps):
    """Build the cache of `paths` into `folder` (a temporary folder, then one rename). stamps: the files' stamps
    (file_stamp) when their digests were taken: a file written to since then is refused, so that the folder holds
    the tokens of the contents its key names."""
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"[pair_cache] tokenizing {','.join(paths)} once into {folder}")
    try:
        _, _, meta = build(paths, tokenizer, max_len, keys, tmp, workers)
        for path, stamp in zip(paths, stamps):
            if file_stamp(path) != stamp:
                raise DataError(f"{path} was written to while it was being tokenized; run again once it is "
                                "complete")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    files.fsync_tree(tmp)  # after a power cut the folder is whole or absent, never renamed in with holes
    shutil.rmtree(folder, ignore_errors=True)  # a folder without meta.json is an interrupted build's
    files.replace(tmp, folder)


# ----------------------------------------------------------------------------------------------------------------
# reading: PairStore


class PairStore:
    """The kept pairs of one or more data files as a sequence of batches.Example, read on demand from the arrays
    (memory-mapped from a cache folder, or in memory). index: which pairs of the arrays, in order (None: all)."""

    def __init__(self, arrays, meta, folder, index=None):
        self.meta, self.folder, self.index = meta, folder, index
        if arrays is None:
            arrays = {name: np.memmap(os.path.join(folder, name + ".bin"), dtype=dtype, mode="r")
                      if os.path.getsize(os.path.join(folder, name + ".bin")) else np.zeros(0, dtype)
                      for name, dtype in [("tokens", meta["token_dtype"]), *meta["columns"].items()]}
        self.arrays = arrays

    def __len__(self):
        return self.meta["pairs"] if self.index is None else len(self.index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        return self.example(int(self.index[i]) if self.index is not None else int(i) % len(self))

    def take(self, indices):
        """The pairs at `indices` (of this store) as a store of their own (no copy of the tokens)."""
        indices = np.asarray(indices, dtype=np.int64)
        return PairStore(self.arrays, self.meta, self.folder, indices if self.index is None else self.index[indices])

    def column(self, name):
        """One value per pair of this store, as an array in memory (a plain read, so that the map's pages are not
        all touched by a pass over the whole column)."""
        if self.folder is not None:
            values = np.fromfile(os.path.join(self.folder, name + ".bin"), dtype=self.meta["columns"][name])
        else:
            values = self.arrays[name]
        return values if self.index is None else values[self.index]

    def example(self, k):
        c = {name: self.arrays[name][k].item() for name in COLUMNS}
        n = c["prompt"] + c["chosen"] + c["rejected"] + max(c["teacher"], 0)
        ids = self.arrays["tokens"][c["start"]:c["start"] + n].tolist()
        prompt, rest = ids[:c["prompt"]], ids[c["prompt"]:]
        kept = lambda k: prompt[len(prompt) - k:]  # noqa: E731  every row keeps the prompt's end
        chosen, rejected = rest[:c["chosen"]], rest[c["chosen"]:c["chosen"] + c["rejected"]]
        teacher = None
        if c["teacher"] >= 0:
            teacher = (kept(c["kept_teacher"]), rest[c["chosen"] + c["rejected"]:])
        return Example(prompt=(kept(c["kept_chosen"]), kept(c["kept_rejected"])), chosen=chosen, rejected=rejected,
                       margin=None if math.isnan(c["margin"]) else c["margin"], teacher=teacher,
                       prompt_len=c["prompt_len"],
                       cuts=(CUTS[c["cut_chosen"]], CUTS[c["cut_rejected"]], CUTS[c["cut_teacher"]]))
