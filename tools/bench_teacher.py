"""Benchmarks of rmd's teacher side (no torch): the teacher client's throughput against a loopback server, what
a flaky teacher costs distill in kept rows and requests, and the request cache's memory and rate. Each section prints
a table; bench.py has the student side.

    python -m tools.bench_teacher --only teacher,yield     # the first two sections (a few minutes)
    python -m tools.bench_teacher --only teacher --workers 1,8,32 --latency 0.2   # distill's request rate vs workers
    python -m tools.bench_teacher --only yield --rows 200 --fault-rate 0.3         # distill yield under faults (~30 s)
    python -m tools.bench_teacher --only cache --baseline /tmp/rmd-main            # the request cache vs another
        # checkout's (git worktree add /tmp/rmd-main main): distill's RSS and wall time (50k rows: ~40 min on 2 cores)

Both run distill.py against fault_server.py (127.0.0.1 only): "teacher" against a server that answers every request
after a fixed latency, "yield" through a server that makes --fault-rate of all replies faulty in front of sim.py's
teacher, vs a clean pass-through in front of the same teacher. "cache" runs each measurement in a fresh process in
the checkout it measures.
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


# ----------------------------------------------------------------------------- section "cache"

# One measurement in a fresh process, in the checkout it measures (this one, or --baseline's: today's teacher.Cache),
# using only what both have. argv: mode, n, work folder, threads -> one JSON line on stdout.
CACHE_WORKER = r"""
import contextlib, dataclasses, io, json, os, resource, sys, threading, time
mode, n, work, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
out = {}
if mode == "data":  # the simulated world's first n distill rows
    from demo import sim
    sim.write_builtin_data(work, sim.WorldConfig(n_distill=n))
elif mode == "distill":  # distill of them against the simulated teacher served in this process (as the demo does)
    import distill
    from demo import sim, sim_server
    url, stop = sim_server.start_server(sim.WorldConfig(n_distill=n))
    cfg = distill.DistillConfig(data=os.path.join(work, "distill.jsonl"), out=os.path.join(work, "out"),
                                teacher_url=url, teacher_model=sim.TEACHER_MODEL, workers=threads, progress=False)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        summary = distill.distill(cfg)
    out = {"wall_s": time.perf_counter() - t0, "kept": summary["kept"],
           "sent": sum(st["sent"] for st in summary["stages"].values()),
           "cache_hits": sum(st["cache_hits"] for st in summary["stages"].values()),
           "cache_mib": os.path.getsize(os.path.join(work, "out", "cache.jsonl")) / 2**20}
    stop()
else:  # "fetch": n requests' replies stored by `threads` threads; "loopback": each posted to a loopback server first
    import socketserver, teacher
    from tools.fault_server import FaultServer
    socketserver.StreamRequestHandler.disable_nagle_algorithm = True  # else each reply waits ~40 ms (delayed ACK)
    cache = teacher.Cache(os.path.join(work, f"{mode}.jsonl"))
    canned = {"content": "word " * 400, "finish_reason": "stop", "usage": {"prompt_tokens": 600}}  # distill-sized
    with FaultServer() as server:
        client = teacher.Client(server.url, workers=threads, limiter=teacher.RateLimiter())
        def send(body):
            reply = dataclasses.asdict(client.post(body)[0]) if mode == "loopback" else canned
            return {"stage": "refine", "row": body["messages"][0]["content"], "attempts": 1, "seconds": 0.1,
                    "reply": reply}
        def ask(t):
            for i in range(t, n, threads):
                body = {"model": "m", "messages": [{"role": "user", "content": f"r{i}"}], "max_tokens": 8}
                cache.fetch(teacher.request_key(body), lambda: send(body))
        t0 = time.perf_counter()
        pool = [threading.Thread(target=ask, args=(t,)) for t in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        out = {"wall_s": time.perf_counter() - t0}
    cache.close()
print(json.dumps({**out, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cache_worker(root, mode, n, work, threads):
    import subprocess
    done = subprocess.run([sys.executable, "-c", CACHE_WORKER, mode, str(n), work, str(threads)], cwd=root,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: the cache worker ({mode}, in {root}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def bench_cache(args):
    """teacher.Cache here vs --baseline's (a checkout of an earlier rmd, e.g. `git worktree add /tmp/rmd-main main`),
    each in fresh processes: (1) distill of --cache-rows rows of the simulated world against its teacher in the same
    process, then the same command again (every request from the cache): wall time and peak RSS (--cache-rows 0: not
    measured); (2) requests/s of --cache-threads threads storing --cache-requests replies, with no server (the
    cache's own ceiling: fsync and locking) and against a loopback server that answers at once; the checkouts take
    turns, so both see the same load."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = [("this checkout", here)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
    work = tempfile.mkdtemp(prefix="rmd-bench-cache-")
    runs, rates = [], []
    try:
        if args.cache_rows:
            cache_worker(here, "data", args.cache_rows, work, 1)
        for name, root in roots if args.cache_rows else []:
            first, again = (cache_worker(root, "distill", args.cache_rows, work, 16) for _ in range(2))
            shutil.rmtree(os.path.join(work, "out"))
            runs.append([name, args.cache_rows, first["sent"], first["kept"], f"{first['cache_mib']:.0f}",
                         f"{first['wall_s']:.1f}", f"{first['peak_rss_mib']:.0f}", again["cache_hits"],
                         f"{again['wall_s']:.1f}", f"{again['peak_rss_mib']:.0f}"])
            print(f"  done distill: {runs[-1]}", file=sys.stderr, flush=True)
        for threads in args.cache_threads:
            for mode in ("fetch", "loopback"):
                for name, root in roots:
                    r = cache_worker(root, mode, args.cache_requests, work, threads)
                    rates.append([name, mode, args.cache_requests, threads, f"{args.cache_requests / r['wall_s']:.0f}"])
                    os.remove(os.path.join(work, f"{mode}.jsonl"))
            print(f"  done threads={threads}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if runs:
        print_table(f"cache: distill of the simulated world's first {args.cache_rows} rows against its teacher in the "
                    "same process (16 workers), then the same command again (every request from the cache); fresh "
                    "process each", ["teacher.Cache", "rows", "requests", "kept", "cache MiB", "wall s",
                                     "peak RSS MiB", "rerun: cached", "rerun wall s", "rerun peak RSS MiB"], runs)
    print_table("cache: requests/s of threads storing distill-sized replies (fetch: no server, the cache alone; "
                "loopback: each posted first to a loopback server that answers at once)",
                ["teacher.Cache", "send", "requests", "threads", "req/s"], rates)


SECTIONS = {"teacher": bench_teacher, "yield": bench_yield, "cache": bench_cache}


@dataclass
class TeacherBenchConfig:
    only: str = ""  # sections to run, comma-separated (default: all): teacher, yield, cache
    latency: float = 0.2  # teacher: server latency, seconds
    workers: str = ""  # teacher: worker counts, comma-separated (default 1,8,32,128)
    rows: int = 200  # yield: sim.py distill rows
    fault_rate: float = 0.3  # yield: share of faulty replies
    fault_seeds: str = ""  # yield: fault seeds, comma-separated (default 0,1,2)
    baseline: str = ""  # cache: a checkout of another rmd to compare with (e.g. git worktree add /tmp/rmd-main main)
    cache_rows: int = 50000  # cache: distill rows of the simulated world
    cache_requests: int = 5000  # cache: requests stored per requests/s measurement
    cache_threads: str = ""  # cache: thread counts storing them, comma-separated (default 1,8,16)


def parse_args(argv):
    """The command line -> TeacherBenchConfig, its comma-separated lists as lists (None when not given)."""
    cfg = parse_overrides(TeacherBenchConfig(), argv, "python -m tools.bench_teacher", "Times distill's teacher "
                          "client against a loopback server, counts what a flaky teacher costs, and measures the "
                          "request cache; one table per section.")
    only = [x for x in cfg.only.split(",") if x] or None
    unknown = [x for x in only or [] if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: --only={cfg.only}: no section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    try:
        ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
        return types.SimpleNamespace(**{**asdict(cfg), "only": only, "workers": ints(cfg.workers),
                                        "fault_seeds": ints(cfg.fault_seeds),
                                        "cache_threads": ints(cfg.cache_threads) or [1, 8, 16]})
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
