"""cli.py: one command-line style for every rmd command and tool, read from a config dataclass.

Each option is a field of a dataclass; `--key=value` or `--key value` (dashes or underscores) overrides its
default, type-checked against it; `--help` lists every option with its type, default and meaning, the meaning
being the field's `# comment` in the source, so the help never drifts from the code. A typo gets "did you mean",
names people bring from TRL/transformers/OpenRLHF are accepted (ALIASES) or answered with the rmd name (HINTS),
and every mistake is a UsageError with one line; a command's entry point runs inside one_line_errors(), which turns
it (and a DataError) into `error: <line>` and exit status 1. Standard library only (formats.py for the two errors).

    cfg = parse_overrides(TrainConfig(), sys.argv[1:], prog="python rmd.py train")

    if __name__ == "__main__":
        with one_line_errors():
            main()
"""
import ast
import contextlib
import difflib
import inspect
import io
import os
import sys
import textwrap
import time
import tokenize
from dataclasses import asdict, fields

from files import FolderBusy
from formats import DataError, UsageError


# Names people bring from TRL / transformers / OpenRLHF: accepted for the rmd option they mean exactly (used only
# where the config has that field) ...
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "max_epochs": "epochs", "output_dir": "out",
           "save_path": "out", "model_name_or_path": "model", "pretrain": "model", "max_length": "max_len",
           "warmup_ratio": "warmup", "max_grad_norm": "grad_clip", "logging_steps": "log_interval",
           "eval_steps": "eval_interval", "save_steps": "save_interval", "dataset": "data", "train_file": "data",
           "train_batch_size": "batch_size", "micro_train_batch_size": "micro_batch",
           "per_device_eval_batch_size": "eval_batch"}
# ... or answered with the rmd way to say it where the meaning differs: {name: (the rmd field it concerns, answer)}
HINTS = {"per_device_train_batch_size": ("micro_batch", "rmd's batches are global: --batch-size is pairs per "
                                         "optimizer step over all processes, --micro-batch pairs per forward pass "
                                         "per process (TRL's per-device size); accumulation follows"),
         "gradient_accumulation_steps": ("micro_batch", "give --batch-size (pairs per optimizer step, all "
                                         "processes) and --micro-batch (pairs per forward pass): accumulation follows"),
         "warmup_steps": ("warmup", "--warmup is a fraction of the steps, e.g. --warmup=0.03"),
         "bf16": ("dtype", "use --dtype=bfloat16 (the default, auto, uses it on CUDA)"),
         "lr_scheduler_type": ("min_lr", "rmd's schedule is linear warm-up (--warmup), then cosine down to --min-lr")}


def field_comments(cls):
    """{field: its comment} read from the dataclass's source: the `# ...` on the field's line, else the comment
    lines right above it; a subclass's fields over its bases'. --help is generated from it, so the help says what
    a reader of the class sees."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" in vars(klass):
            comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls):
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. defined interactively): help without meanings
        return {}
    trailing, own_line = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (own_line if tok.line.lstrip().startswith("#") else trailing)[tok.start[0]] = text
    comments = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = next((trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing), None)
            if text is None:
                above, n = [], node.lineno - 1
                while n in own_line:
                    above.insert(0, own_line[n])
                    n -= 1
                text = " ".join(above)
            comments[node.target.id] = text
    return comments


def option_help(defaults, prog="", about=""):
    """The --help text of a config dataclass: every option with its type, default and meaning."""
    meanings = field_comments(type(defaults))
    names = [f.name for f in fields(defaults)]
    show = {bool: lambda v: str(v).lower(), str: lambda v: v if v else '""'}
    rows = [(f"--{n.replace('_', '-')}", type(getattr(defaults, n)).__name__,
             show.get(type(getattr(defaults, n)), str)(getattr(defaults, n)), meanings.get(n, "")) for n in names]
    width = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = [f"usage: {prog or 'python ' + os.path.basename(sys.argv[0])} [--key=value ...]"]
    if about:
        lines += ["", about]
    lines += ["", "options (--key=value or --key value; dashes or underscores; bools: --flag, --flag=false):",
              f"  {'option':<{width[0]}}  {'type':<{width[1]}}  {'default':<{width[2]}}  meaning"]
    lines += [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c:<{width[2]}}  {d}".rstrip() for a, b, c, d in rows]
    aliases = [f"--{a.replace('_', '-')} (= --{t.replace('_', '-')})" for a, t in ALIASES.items() if t in names]
    if aliases:
        lines += ["", "also accepted (TRL / transformers / OpenRLHF names): " + ", ".join(aliases)]
    return "\n".join(lines)


def parse_overrides(defaults, argv, prog="", about=""):
    """A copy of dataclass `defaults` with --key=value / --key value overrides, type-checked against the defaults.
    --help / -h prints option_help and exits 0 (asking for help is asking the command line); a mistake raises a
    UsageError with one line."""
    if "--help" in argv or "-h" in argv:
        print(option_help(defaults, prog, about))
        raise SystemExit(0)
    types = {f.name: type(getattr(defaults, f.name)) for f in fields(defaults)}
    aliases = {a: t for a, t in ALIASES.items() if t in types}
    hints = {a: text for a, (t, text) in HINTS.items() if t in types}
    see = f"`{prog} --help` lists the options" if prog else "--help lists the options"
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}; options are --key=value ({see})")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = aliases.get(key, key)
        if key not in types:
            raise UsageError(f"unknown option --{key.replace('_', '-')}{_suggest(key, types, aliases, hints)} ({see})")
        if not eq:
            if types[key] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            else:
                raise UsageError(f"--{key.replace('_', '-')} needs a value")
        values[key] = _convert(key, value, types[key])
        i += 1
    return type(defaults)(**{**asdict(defaults), **values})


def _suggest(key, types, aliases, hints):
    """'; did you mean --x?' for a typo (difflib), or the rmd way to say a TRL/HF option."""
    if key in hints:
        return f" (a TRL/HF name): {hints[key]}"
    match = difflib.get_close_matches(key, list(types) + list(aliases) + list(hints), n=1, cutoff=0.6)
    if not match:
        return ""
    name = match[0]
    if name in hints:
        return f"; {hints[name]}"
    target = aliases.get(name, name).replace("_", "-")
    return f"; did you mean --{target}?"


def _convert(key, value, kind):
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
        return kind(value)
    except (KeyError, ValueError):
        expected = {"bool": "bool (true or false)", "float": "float (a number)"}.get(kind.__name__, kind.__name__)
        raise UsageError(f"--{key.replace('_', '-')}={value!r}: expected {expected}") from None



@contextlib.contextmanager
def one_line_errors():
    """Around a command's entry point: a UsageError or DataError (a mistake of the person running it, said in one
    line) or a FolderBusy (another run in its output folder) becomes `error: <line>` on stderr and exit status 1;
    any other exception is a bug and keeps its traceback."""
    try:
        yield
    except (UsageError, DataError, FolderBusy) as e:
        raise SystemExit(f"error: {e}") from None


def clock(seconds):
    """Seconds as h:mm:ss or m:ss."""
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a job with a known size, with elapsed time and ETA: one bar redrawn in place on a terminal, plain
    lines (at most one per `every` seconds, and the last one) in a log. ETA = elapsed / done * left (0 done: '?')."""

    def __init__(self, total, label, file=None, every=10.0, width=24):
        self.total, self.label, self.file = max(1, total), label, file or sys.stderr
        self.every, self.width, self.t0, self.last = every, width, time.time(), float("-inf")
        self.tty = hasattr(self.file, "isatty") and self.file.isatty()

    def timing(self, done, now=None):
        """'0:30 elapsed, ETA 1:30' after `done` of `total`."""
        elapsed = (now if now is not None else time.time()) - self.t0
        eta = clock(elapsed / done * (self.total - done)) if done else "?"
        return f"{clock(elapsed)} elapsed, ETA {eta}"

    def line(self, done, text="", now=None):
        frac = min(1.0, done / self.total)
        bar = f"|{'#' * round(frac * self.width):<{self.width}}| " if self.tty else ""
        return (f"[{self.label}] {bar}{done}/{self.total} ({100 * frac:.0f}%) {self.timing(done, now)}"
                + (f" | {text}" if text else ""))

    def update(self, done, text="", final=False):
        now = time.time()
        if not (self.tty or final or now - self.last >= self.every):
            return
        self.last = now
        end = "\n" if final or not self.tty else ""
        print(("\r\033[K" if self.tty else "") + self.line(done, text, now), end=end, file=self.file, flush=True)
