"""Benchmarks of rmd's teacher side (no torch): the teacher client's throughput against a loopback server, and what
a flaky teacher costs distill in kept rows and requests. Each section prints a table; bench.py has the student side.

    python -m tools.bench_teacher                          # both sections (a few minutes)
    python -m tools.bench_teacher --only teacher --workers 1,8,32 --latency 0.2   # distill's request rate vs workers
    python -m tools.bench_teacher --only yield --rows 200 --fault-rate 0.3         # distill yield under faults (~30 s)

Both run distill.py against fault_server.py (127.0.0.1 only): "teacher" against a server that answers every request
after a fixed latency, "yield" through a server that makes --fault-rate of all replies faulty in front of sim.py's
teacher, vs a clean pass-through in front of the same teacher.
"""

if not __package__:  # run as a file: the repository's modules are importable only from its root
    raise SystemExit("error: run it from the repository root as a module: python -m tools.bench_teacher")

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass

import distill
from cli import one_line_errors, parse_overrides
from tools.common import machine_description, print_table
from tools.fault_server import FaultServer, yield_comparison


# ----------------------------------------------------------------------------- section "teacher"

def bench_teacher(args):
    """distill.distill against a local server that answers every request after a fixed latency: achieved
    requests/s vs the ideal workers / latency (every request slot busy all the time)."""
    rows = []
    for workers in args.workers or [1, 8, 32, 128]:
        n_rows = max(8, 6 * workers)  # distill keeps 2 x workers rows in flight; 3 waves of them
        arrivals = []
        work = tempfile.mkdtemp(prefix="rmd-bench-teacher-")
        data = os.path.join(work, "in.jsonl")
        with open(data, "w") as f:
            for i in range(n_rows):
                f.write(json.dumps({"id": f"r{i}", "prompt": f"question {i}?", "chosen": f"good answer {i}",
                                    "rejected": f"bad answer {i}"}) + "\n")
        try:
            with FaultServer(latency=args.latency, fault=lambda body, n: arrivals.append(time.perf_counter())) \
                    as server:
                cfg = distill.DistillConfig(data=data, out=os.path.join(work, "out"), teacher_url=server.url,
                                            teacher_model="teacher", workers=workers, progress=False,
                                            json_mode="off")
                t0 = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):
                    summary = distill.distill(cfg)
                wall = time.perf_counter() - t0
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ideal = workers / args.latency
        # steady state: the first 80% of arrivals, before rows run out at the tail
        steady = arrivals[:max(2, int(len(arrivals) * 0.8))]
        steady_rate = (len(steady) - 1) / (steady[-1] - steady[0])
        kept = summary.get("kept", summary.get("rows_kept", "?"))
        rows.append([workers, n_rows, len(arrivals), kept, f"{wall:.1f}", f"{ideal:.0f}", f"{len(arrivals) / wall:.1f}",
                     f"{steady_rate:.1f}", f"{100 * steady_rate / ideal:.0f}"])
        print(f"  done workers={workers}", file=sys.stderr, flush=True)
    print_table(f"teacher: distill.distill vs a loopback server (fault_server.py) with {args.latency} s "
                "latency per request; 5 requests per row (generate, annotate x2, refine, score); "
                "ideal = workers / latency; steady = first 80% of requests",
                ["workers", "rows", "requests", "rows kept", "wall s", "ideal req/s", "req/s (whole run)",
                 "req/s (steady)", "steady % of ideal"], rows)


# ----------------------------------------------------------------------------- section "yield"

def bench_yield(args):
    """distill through a server that makes --fault-rate of all replies faulty (429/5xx, stalls, empty,
    finish_reason length, garbage, refusals, huge bodies; fault_server.py:flaky) in front of sim.py's
    teacher, vs a clean pass-through in front of the same teacher, on the same rows."""
    rows = []
    for seed in args.fault_seeds or [0, 1, 2]:
        work = tempfile.mkdtemp(prefix="rmd-bench-yield-")
        try:
            r = yield_comparison(args.rows, work, rate=args.fault_rate, seed=seed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        failed = ", ".join(f"{k} {v}" for k, v in sorted(r["failed"].items())) or "-"
        rows.append([seed, r["rows"], sum(r["faults"].values()), r["clean_kept"], r["faulty_kept"],
                     f"{100 * r['yield']:.1f}", r["clean_requests"], r["faulty_requests"],
                     f"{r['requests_ratio']:.2f}", r["unaccounted"], r["identical"], r["differ_after_reask"],
                     r["teacher_refused"], r["labels_changed"], r["invented"], sum(r["reasks"].values()), failed])
        print(f"  done seed={seed}: faults {r['faults']}, re-asks {r['reasks']}", file=sys.stderr, flush=True)
    print_table(f"yield: distill of sim.py's first {args.rows} rows, clean vs {100 * args.fault_rate:.0f}% faulty "
                "replies (default --reask); identical = kept pair equal to the clean run's; differ = a re-ask "
                "gave another valid answer; refused y_T = an injected refusal became the teacher's answer (as "
                "a refusal must); labels changed / invented: the rejected answer or its score differs "
                "from the clean run's / differs with no re-ask to explain it",
                ["fault seed", "rows", "faults", "clean kept", "faulty kept", "yield %", "clean req", "faulty req",
                 "req ratio", "unaccounted", "identical", "differ (re-ask)", "refused y_T", "labels changed",
                 "invented",
                 "re-asks", "failed"], rows)


SECTIONS = {"teacher": bench_teacher, "yield": bench_yield}


@dataclass
class TeacherBenchConfig:
    only: str = ""  # sections to run, comma-separated (default: all): teacher, yield
    latency: float = 0.2  # teacher: server latency, seconds
    workers: str = ""  # teacher: worker counts, comma-separated (default 1,8,32,128)
    rows: int = 200  # yield: sim.py distill rows
    fault_rate: float = 0.3  # yield: share of faulty replies
    fault_seeds: str = ""  # yield: fault seeds, comma-separated (default 0,1,2)


def parse_args(argv):
    """The command line -> TeacherBenchConfig, its comma-separated lists as lists (None when not given)."""
    cfg = parse_overrides(TeacherBenchConfig(), argv, "python -m tools.bench_teacher", "Times distill's teacher "
                          "client against a loopback server, and counts what a flaky teacher costs; one table per section.")
    only = [x for x in cfg.only.split(",") if x] or None
    unknown = [x for x in only or [] if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: --only={cfg.only}: no section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    try:
        ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
        return types.SimpleNamespace(**{**asdict(cfg), "only": only, "workers": ints(cfg.workers),
                                        "fault_seeds": ints(cfg.fault_seeds)})
    except ValueError as e:
        raise SystemExit(f"error: a comma-separated list of numbers expected: {e}") from None


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(machine_description())
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    with one_line_errors():
        main()
