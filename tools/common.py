"""What every benchmark prints the same way: the machine line, a plain-text table, a field of /proc. No torch here:
bench_teacher.py runs without it."""

import os
import platform


def print_table(title, headers, rows):
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n## {title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def proc_kib(path, field):
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def machine_description(details=()):
    """One line: CPU, cores, RAM, `details` (bench.py adds torch's threads and versions), python, load average."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = proc_kib("/proc/meminfo", "MemTotal") / 2**20
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU: {cpu}, {os.cpu_count()} cores, RAM {mem:.0f} GiB, {''.join(d + ', ' for d in details)}"
            f"python {platform.python_version()}; load average {load} (other jobs share this machine)")
