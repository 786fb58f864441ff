"""formats.py: the rows every command reads and writes -- one reader, one validator, one JSONL writer.

Data files are JSONL (.jsonl, .jsonl.gz), one JSON array (.json) or Parquet (.parquet, needs pyarrow); rows are
objects in one of the accepted forms:
  - pairs       {prompt, chosen, rejected} (+ chosen_score/rejected_score or margin, teacher_response)
  - implicit    {chosen, rejected} whole dialogues sharing the prompt (HH-RLHF, TRL's implicit-prompt format)
  - TRL conversational: prompt/chosen/rejected as chat-message lists
  - pools       {prompt, responses: [...]}   and bare prompts {prompt}   (distill's inputs)
  - RM-Bench    {prompt, chosen: [3], rejected: [3], domain}   RewardBench {prompt, chosen, rejected, subset}
A prompt is a string (an HH-style "\n\nHuman: ... \n\nAssistant:" dialogue becomes its turns) or chat messages.
Every error names `file:line` and what to do. Standard library only (pyarrow for Parquet when asked).
"""
import hashlib
import itertools
import json
import math
import os
import re


class DataError(ValueError):
    """A bad data file or row: the message names file:line and what is wrong."""


class UsageError(ValueError):
    """A wrong option value or combination: the message names the option (--key) and what to pass. The library raises
    it (and DataError); only a command line turns them into `error: <message>` and exit status 1 (cli.one_line_errors),
    so a notebook that calls the library can catch them."""


def _lines(path):
    """(line_no, text) of a UTF-8 file (.gz by suffix): a BOM is dropped and CRLF read as LF; a byte that
    is not UTF-8 is a ValueError naming the file and line (a folder or a missing file: read_source_rows)."""
    import gzip  # only for .gz files
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM (Windows tools)
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    column = len(raw[:e.start].decode("utf-8", "replace")) + 1
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                     f"{column}); save the file as UTF-8") from None
                yield line_no, text.rstrip("\r\n")
    except (OSError, EOFError) as e:  # unreadable, or a broken / truncated .gz
        raise ValueError(f"{path}: cannot be read ({e})") from None


def _json_array_rows(path, lines):
    """The elements of one JSON array, each with the line it starts on."""
    import bisect
    text = "\n".join(t for _, t in lines)
    starts = [0]
    for _, t in lines:
        starts.append(starts[-1] + len(t) + 1)
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    skip = re.compile(r"\s*")
    while True:
        i = skip.match(text, i).end()
        if text.startswith("]", i):
            break
        start = i
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise ValueError(f"{path}:{bisect.bisect(starts, i)}: JSON nested too deeply") from None
        yield bisect.bisect(starts, start), obj
        i = skip.match(text, i).end()
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            raise ValueError(f"{path}:{bisect.bisect(starts, i)}: not valid JSON (expected ',' or ']' in the array)")
    if text[i + 1:].strip():
        raise ValueError(f"{path}:{bisect.bisect(starts, i + 1)}: not valid JSON (text after the array)")


def _parquet_rows(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's own error types
        raise ValueError(f"{path}: cannot be read as Parquet ({e})") from None
    return enumerate(table.to_pylist(), 1)


HUB_PREFIX = "hf:"  # --data=hf:owner/name[/config][:split] reads a Hugging Face Hub dataset (needs `datasets`)


def hub_spec(spec):
    """'hf:owner/name[/config][:split]' -> (name or local folder, config or None, split); split defaults to train.
    A local dataset folder (what `huggingface-cli download` or a git clone gives) may stand for the name."""
    rest = spec[len(HUB_PREFIX):]
    if os.path.isdir(rest):
        return rest, None, "train"
    name, _, split = rest.partition(":")
    if os.path.isdir(name):
        return name, None, split or "train"
    parts = name.split("/")
    if len(parts) not in (2, 3) or not all(parts) or not re.fullmatch(r"[\w.\-\[\]%:]*", split):
        raise ValueError(f"{spec}: a Hub dataset is hf:owner/name[/config][:split], e.g. "
                         "hf:trl-lib/ultrafeedback_binarized:test")
    return "/".join(parts[:2]), parts[2] if len(parts) == 3 else None, split or "train"


def source_problem(path):
    """What is wrong with a data source before anything loads (a folder, a missing file, a bad or unreadable Hub
    spec), or None."""
    if path.startswith(HUB_PREFIX):
        try:
            hub_spec(path)
        except ValueError as e:
            return str(e)
        import importlib.util
        if importlib.util.find_spec("datasets") is None:
            return f"{path}: reading a Hub dataset needs the datasets package (pip install datasets)"
        return None
    if os.path.isdir(path):
        return f"{path} is a folder; give a data file (.jsonl, .jsonl.gz, .json, .parquet) or hf:owner/name"
    if not os.path.isfile(path):
        return f"{path}: no such file"
    return None


def _hub_rows(spec):
    """The rows of a Hub dataset split through `datasets` (its own cache; offline it uses what is cached)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec}: reading a Hub dataset needs the datasets package (pip install datasets)") from None
    name, config, split = hub_spec(spec)
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (network, missing split, bad files)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        network = any(word in str(e).lower() for word in ("reach", "connect", "offline", "resolve"))
        offline = " (no network? with HF_HUB_OFFLINE=1 a cached copy is used; or download the files and give " \
                  "them as --data)" if network else ""
        raise ValueError(f"{spec}: cannot load {name!r} split {split!r}: {detail[:300]}{offline}") from None
    return enumerate(table, 1)


KEY_FIELDS = ("prompt", "chosen", "rejected")  # the fields a --prompt-key / --chosen-key / --rejected-key renames


def column_keys(cfg):
    """{field: the data's column for it} from a config's prompt_key / chosen_key / rejected_key (OpenRLHF's names;
    "" = the field's own name)."""
    return {f: getattr(cfg, f + "_key") for f in KEY_FIELDS if getattr(cfg, f + "_key", "") not in ("", f)}


def rename_columns(row, keys, where):
    """The row with each mapped column under its field's name; a row without the column is an error."""
    for name, column in keys.items():
        if column not in row:
            raise ValueError(f"{where}: missing field {column!r} (--{name}-key={column})")
        row = {**{k: v for k, v in row.items() if k not in (column, name)}, name: row[column]}
    return row


def read_source_rows(path, keys=None, raw=False):
    """Yield (line_no, obj) for each row of a data file: JSONL (.jsonl, .jsonl.gz: one object per non-blank line,
    always), one JSON array (another name, e.g. .json, starting with '['; line_no = the line its element starts on),
    Parquet or a Hub dataset `hf:owner/name[:split]` (line_no = the row number). UTF-8 with or without a BOM, LF or CRLF. Anything else, or a row that is not a JSON
    object, is a `file:line` ValueError. `keys` ({field: column}, see column_keys) renames columns. JSONL is
    streamed; raw=True yields its lines as text, for jsonl_row to parse elsewhere (pair_cache's worker processes)."""
    problem = source_problem(path)  # a folder, a missing file, a bad Hub spec: one check, one message everywhere
    if problem:
        raise ValueError(problem)
    if path.startswith(HUB_PREFIX):
        numbered = _hub_rows(path)
    elif path.endswith(".parquet"):
        numbered = _parquet_rows(path)
    else:
        lines, head = _lines(path), []  # JSONL is streamed: a large file is never held whole
        for item in lines:
            head.append(item)
            if item[1].strip():
                break
        first, lines = (head[-1][1].lstrip() if head else ""), itertools.chain(head, lines)
        if first.startswith("[") and not path.endswith((".jsonl", ".jsonl.gz")):  # .jsonl: always JSONL
            numbered = _json_array_rows(path, list(lines))
        else:
            for line_no, line in lines:
                if line.strip():
                    yield (line_no, line) if raw else (line_no, jsonl_row(path, line_no, line, keys))
            return
    for line_no, obj in numbered:
        yield line_no, checked_row(path, line_no, obj, keys)


def jsonl_row(path, line_no, line, keys=None):
    """One JSONL line -> its row, checked and renamed as read_source_rows does."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}:{line_no}: JSON nested too deeply") from None
    return checked_row(path, line_no, obj, keys)


def checked_row(path, line_no, obj, keys):
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    return rename_columns(obj, keys, f"{path}:{line_no}") if keys else obj


HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


def parse_dialogue(text):
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (HH-RLHF) -> chat messages; None when the text is not in that form.
    A trailing empty 'Assistant:' turn (the one that opens the answer) is dropped."""
    if not isinstance(text, str) or not text.lstrip().startswith(tuple(f"{name}:" for name in HH_ROLES)):
        return None
    pattern = "|".join(HH_ROLES)
    parts = re.split(rf"(?:^|\n\n)({pattern}):", "\n\n" + text.lstrip())
    messages = [{"role": HH_ROLES[name], "content": content.strip()} for name, content in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def answer_text(value):
    """An answer given as a string or as a message list ending in an assistant message -> its text (else None)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    return None


def split_implicit_prompt(chosen, rejected):
    """Rows without a prompt hold whole dialogues: the shared prefix, up to the last 'Assistant:' turn (or the
    shared leading messages), is the prompt. Returns (prompt, chosen, rejected)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise ValueError("without 'prompt', 'chosen' and 'rejected' must both be strings or both message lists")
    n = len(os.path.commonprefix([chosen, rejected]))
    marker = chosen.rfind("\n\nAssistant:", 0, n)
    if marker >= 0:
        n = marker + len("\n\nAssistant:")
    return chosen[:n], chosen[n:], rejected[n:]


def canonical(obj):
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def row_id(row):
    """The row's own `id`, or a hash of its content (stable across runs, shards and reorderings)."""
    if row.get("id") is not None:
        return str(row["id"])
    content = {k: row.get(k) for k in ("prompt", "chosen", "rejected", "responses")}
    return "h" + hashlib.sha256(canonical(content).encode()).hexdigest()[:16]


CHAT_ROLES = ("system", "developer", "user", "assistant")


def check_messages(messages):
    """The one rule for a prompt given as chat messages, in every command (distill, train, eval, bon, serve): a
    non-empty list of {role, content}, role one of CHAT_ROLES, content a string or a list of text parts.
    Returns what is wrong, or None."""
    if not isinstance(messages, list) or not messages:
        return "field 'prompt' must be a string or a non-empty list of chat messages {role, content}"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"prompt[{k}] must be a message {{role, content}}"
        if m["role"] not in CHAT_ROLES:
            return f"prompt[{k}] has role {m['role']!r}; a role is one of {', '.join(CHAT_ROLES)}"
        if not isinstance(m.get("content"), (str, list)):
            return f"prompt[{k}].content must be a string or a list of text parts"
    return None


def _check_prompt(prompt):
    """distill's prompt rule: check_messages, plus what generation needs (text, and a last turn by the user)."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "prompt is empty"
    problem = check_messages(prompt)
    if problem:
        return problem
    if prompt[-1]["role"] != "user":
        return "the last prompt message must have role 'user'"
    return None


def answer_problem(name):
    """The one message for an answer field that is no answer, in every command."""
    return f"field '{name}' must be a string or a message list ending in an assistant message"


def split_pair(row):
    """The one reading of a pair row, for every command (distill, train, eval): (prompt, chosen, rejected) with
    string answers. Without 'prompt', chosen and rejected are whole dialogues and their shared start is the prompt.
    A ValueError says what is wrong; the caller adds where (file:line)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing field '{key}' (rows need prompt, chosen, rejected)")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = row["prompt"]
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("no 'prompt' field and chosen/rejected share no prompt prefix")
    texts = {"chosen": answer_text(chosen), "rejected": answer_text(rejected)}
    for key, text in texts.items():
        if text is None:
            raise ValueError(answer_problem(key))
    return prompt, texts["chosen"], texts["rejected"]


def _normalize_row(row):
    """A row in any accepted form -> (row with prompt and string answers, None) or (None, what is wrong)."""
    if "prompt" not in row and ("chosen" not in row or "rejected" not in row):
        return None, "missing field 'prompt'"
    if "chosen" in row or "rejected" in row:
        try:
            prompt, chosen, rejected = split_pair(row)
        except ValueError as e:
            return None, str(e)
        row = {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    return row, None


def _check_row(row):
    problem = _check_prompt(row["prompt"])
    if problem:
        return problem
    if isinstance(row.get("id"), (bool, dict, list)):
        return "id must be a string or an integer"
    if "chosen" not in row and "responses" in row:
        r = row["responses"]
        if not isinstance(r, list) or len(r) < 2 or not all(isinstance(x, str) for x in r):
            return "'responses' must be a list of at least two strings"
    return None


def load_distill_rows(path, limit=0, shard="", keys=None):
    """Validated rows in input order, each with `id`, `line` and `kind` (pair|pool|prompt); all errors at once."""
    rows, errors, seen = [], [], {}
    for line_no, row in read_source_rows(path, keys):
        where = f"{path}:{line_no}"
        row, problem = _normalize_row(row)
        problem = problem or _check_row(row)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        rid = row_id(row)
        if rid in seen:
            if row.get("id") is not None:
                errors.append(f"{where}: duplicate id {rid!r} (first at line {seen[rid]}); ids must be unique")
                continue
            rid = f"{rid}#{sum(1 for k in seen if k.split('#')[0] == rid) + 1}"  # repeated content, no id
        seen[rid] = line_no
        kind = "pair" if "chosen" in row else "pool" if "responses" in row else "prompt"
        rows.append({**row, "id": rid, "line": line_no, "kind": kind})
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{len(errors)} bad input row(s):\n" + "\n".join(errors[:20]) + more)
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty or blank)")
    if limit:
        rows = rows[:limit]
    if shard:
        k, n = (int(x) for x in shard.split("/"))
        rows = [r for i, r in enumerate(rows) if i % n == k]
    return rows


def message_text(message):
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def as_messages(prompt, where):
    if isinstance(prompt, str):
        return parse_dialogue(prompt) or [{"role": "user", "content": prompt}]
    problem = check_messages(prompt)  # the same rule as distill's (_check_prompt)
    if problem:
        raise DataError(f"{where}: {problem}")
    return [{"role": m["role"], "content": message_text(m)} for m in prompt]


def number(row, key, where):
    if key not in row:
        raise DataError(f"{where}: missing field '{key}' (a score needs its pair: give chosen_score and "
                        "rejected_score, or margin)")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{key}' must be a finite number, got {value!r}")
    return float(value)


def parse_row(row, where):
    """One JSONL object -> (messages, chosen, rejected, margin or None, teacher_response)."""
    try:
        prompt, chosen, rejected = split_pair(row)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    messages = as_messages(prompt, where)
    margin = None
    if "margin" in row:
        margin = number(row, "margin", where)
    elif "chosen_score" in row or "rejected_score" in row:
        margin = number(row, "chosen_score", where) - number(row, "rejected_score", where)
    teacher = row.get("teacher_response")
    if teacher is not None and not isinstance(teacher, str):
        raise DataError(f"{where}: field 'teacher_response' must be a string")
    return messages, chosen, rejected, margin, teacher


def read_located_rows(path, keys=None):
    """Any data source read_source_rows reads (RM-Bench ships one JSON array) -> [(file:line, row)]."""
    try:
        return [(f"{path}:{n}", row) for n, row in read_source_rows(path, keys)]
    except ValueError as e:
        raise DataError(str(e)) from None


def answer_of(value, name, where):
    text = answer_text(value)
    if text is None:
        raise DataError(f"{where}: {answer_problem(name)}")
    return text


def detect_format(row, where):
    if isinstance(row.get("chosen"), list) and row["chosen"] and all(isinstance(c, str) for c in row["chosen"]):
        if not (isinstance(row.get("rejected"), list) and len(row["rejected"]) == len(row["chosen"]) == 3):
            raise DataError(f"{where}: RM-Bench rows need 'chosen' and 'rejected' as lists of 3 answers "
                                "(concise, detailed, markdown)")
        return "rmbench"
    return "rewardbench" if "subset" in row else "pairs"


def write_jsonl(path, rows):
    """Write rows as JSONL atomically (files.atomic_file: a temporary file, fsynced, renamed in, the folder fsynced):
    a crash of the process or of the machine never leaves half a file."""
    from files import atomic_file  # here, not at the top: reading rows (model.py's companion) needs only this file
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
