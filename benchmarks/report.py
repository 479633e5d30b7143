"""Run the benchmark suites and write the report: one command, from the repository root.

    python benchmarks/report.py [--ops slot_match] [--out benchmarks/results] [--quick] [--save]

Runs pytest-benchmark on benchmarks/bench_<op>.py (all suites by default) and prints, per group (op, pass,
preset), a markdown table of the implementations: median time, speedup against eager and torch.compile and, on
CUDA, peak memory and achieved bandwidth against the machine's measured ceiling (a large device-to-device copy).
On CUDA it always writes benchmarks/results/<gpu>-<date>-<suites>.json (the raw pytest-benchmark JSON with a
header: GPU, torch and triton versions, commit measured, date, ceiling; <suites> is the --ops list joined by "-",
or "all") and the same table as <gpu>-<date>-<suites>.md; on CPU only with --save (cpu-<date>-<suites>.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

# pytest-benchmark repeats each case until max-time has passed (at least min-rounds times). Full: about three
# minutes for slot_match on 2 CPU cores, most of it torch.compile; quick: a smoke test of every case.
TIMING = {
    "full": ["--benchmark-max-time=0.5", "--benchmark-min-rounds=5"],
    "quick": ["--benchmark-max-time=0.02", "--benchmark-min-rounds=2"],
}


# The compiled reference of Hungarian matching breaks its graph at scipy: expected, it is the honest baseline.
SCIPY_GRAPH_BREAK = "Dynamo does not know how to trace the builtin `scipy"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", help="suites to run, e.g. slot_match (default: every bench_<op>.py)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results", help="where result files go")
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke test, not a measurement")
    parser.add_argument("--save", action="store_true", help="write the result files on CPU too")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="sets KDFAST_BENCH_DEVICE (default: cuda if any)")
    parser.add_argument("--dtype", help="sets KDFAST_BENCH_DTYPE: float32 (default), bfloat16 or float16 on CUDA")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting cases")
    return parser.parse_args(argv)


def suite_files(ops: list[str] | None) -> list[Path]:
    available = {path.stem.removeprefix("bench_"): path for path in sorted(BENCHMARKS.glob("bench_*.py"))}
    if not ops:
        return list(available.values())
    unknown = [op for op in ops if op not in available]
    if unknown:
        sys.exit(f"report.py: no suite for {', '.join(unknown)}; available: {', '.join(available)}")
    return [available[op] for op in ops]


def run_suites(files: list[Path], args: argparse.Namespace) -> tuple[dict | None, int]:
    """Run pytest-benchmark in a subprocess of this interpreter; its JSON (None if it wrote none) and exit code."""
    env = dict(os.environ)
    # Test-suite settings that would slow kernels down: NaN poisoning of outputs, the Triton interpreter.
    env.pop("KDFAST_POISON", None)
    env.pop("TRITON_INTERPRET", None)
    if args.device:
        env["KDFAST_BENCH_DEVICE"] = args.device
    if args.dtype:
        env["KDFAST_BENCH_DTYPE"] = args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "benchmark.json"
        # -W: torch's own deprecation warnings and dynamo's note on the (expected) scipy graph break of the
        # compiled Hungarian baseline would bury the report; --benchmark-quiet: our table replaces pytest-benchmark's.
        command = [sys.executable, "-m", "pytest", *map(str, files), "-p", "no:cacheprovider", "-q",
                   "-W", "ignore::DeprecationWarning", "-W", f"ignore:{SCIPY_GRAPH_BREAK}:UserWarning",
                   f"--benchmark-json={json_path}", "--benchmark-quiet",
                   *TIMING["quick" if args.quick else "full"]]
        if args.keyword:
            command += ["-k", args.keyword]
        print("$", shlex.join(command), flush=True)
        returncode = subprocess.run(command, check=False, cwd=REPO, env=env).returncode
        data = read_json(json_path)
    return data, returncode


def read_json(path: Path) -> dict | None:
    """pytest-benchmark's JSON, or None when it wrote none or a partial file (a suite that failed to collect)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def copy_bandwidth_ceiling(nbytes: int = 1 << 30, runs: int = 10) -> float:
    """Best device-to-device copy bandwidth in bytes/s, counting the bytes read and written."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    best = math.inf
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del source, target
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def git_commit() -> str:
    """The commit measured, with "-dirty" when the tree differs from it (results files do not count)."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], check=False, cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "none (no commit yet)"
    changes = git("status", "--porcelain", "--", ".", ":!benchmarks/results").stdout.strip()
    return head.stdout.strip() + ("-dirty" if changes else "")


def make_header(device: str, dtype: str, ceiling: float | None, machine_info: dict, load: float) -> dict:
    """Where and what was measured. ``load``: the highest 1-minute load average seen before or after the run."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        cpu = machine_info.get("cpu", {}).get("brand_raw") or platform.processor() or "cpu"
        machine = f"{cpu}, {torch.get_num_threads()} threads"
    try:
        import kdfast

        backends = kdfast.info()
    except Exception as exc:  # noqa: BLE001 - the header is informative; the suite already ran
        backends = {"error": str(exc)}
    return {
        "machine": machine,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "copy_bandwidth_ceiling_bytes_per_s": ceiling,
        "cpu_load": load,
        "cpu_count": os.cpu_count(),
        "kdfast": backends,
    }


def group_rows(data: dict) -> dict[str, list[dict]]:
    """Benchmarks by group, in the order they ran: (op, pass, preset) -> one row per implementation."""
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        groups.setdefault(bench["group"], []).append({**info, "median": bench["stats"]["median"]})
    return groups


def speedup(rows: list[dict], baseline: str, row: dict) -> float | None:
    base = next((r["median"] for r in rows if r["impl"] == baseline), None)
    return None if base is None else base / row["median"]


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def fmt_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def render_table(rows: list[dict], ceiling: float | None) -> list[str]:
    on_cuda = rows[0]["device"].startswith("cuda")
    columns = ["implementation", "median (µs)", "vs eager", "vs compile"]
    if on_cuda:
        columns += ["peak memory", "GB/s", "% of ceiling"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [row["impl"], f"{row['median'] * 1e6:.1f}", fmt_ratio(speedup(rows, "eager", row)),
                 fmt_ratio(speedup(rows, "compile", row))]
        if on_cuda:
            bandwidth = row["bytes"] / row["median"]
            cells += [fmt_bytes(row.get("peak_memory_bytes", 0)), f"{bandwidth / 1e9:.1f}",
                      f"{100 * bandwidth / ceiling:.1f}%" if ceiling else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_line(group: str, rows: list[dict]) -> str:
    """"<group>: kdfast-<fastest backend> is Nx eager, Mx compile"."""
    kdfast_rows = [row for row in rows if row["impl"].startswith("kdfast-")]
    if not kdfast_rows:
        return f"{group}: no kdfast backend ran"
    best = min(kdfast_rows, key=lambda row: row["median"])
    return (f"{group}: {best['impl']} is {fmt_ratio(speedup(rows, 'eager', best))} eager, "
            f"{fmt_ratio(speedup(rows, 'compile', best))} compile")


def render(groups: dict[str, list[dict]], header: dict) -> str:
    ceiling = header["copy_bandwidth_ceiling_bytes_per_s"]
    lines = [f"# kdfast benchmarks: {header['machine']}", ""]
    lines.append(f"device {header['device']}, dtype {header['dtype']}, torch {header['torch']}, "
                 f"triton {header['triton']}, python {header['python']}, commit {header['commit']}, "
                 f"date {header['date']}")
    if ceiling:
        lines.append(f"bandwidth ceiling (1 GiB device-to-device copy, read + write, best of 10): "
                     f"{ceiling / 1e9:.0f} GB/s")
    if header["device"] == "cpu" and header["cpu_load"] > header["cpu_count"] / 2:
        # OpenMP kernels (the cpp backend, inductor's) stall whole time slices when other processes hold the
        # cores: a loaded machine can turn microseconds into milliseconds.
        lines.append(f"**Warning:** load average up to {header['cpu_load']:.1f} on {header['cpu_count']} cores "
                     "around the run: other processes competed for the CPU; the times are not reliable.")
    if header["keeps_freed_memory"]:
        lines.append("Freed memory stays in the process (glibc mallopt, benchmarks/conftest.py keep_freed_memory): "
                     "large outputs reuse memory, as under a caching allocator, instead of faulting in fresh pages.")
    lines += ["", "Speedups are ratios of medians measured side by side in this run (> 1: faster).", "",
              "## Summary", ""]
    lines += [f"- {summary_line(group, rows)}" for group, rows in groups.items()]
    for group, rows in groups.items():
        lines += ["", f"## {group} ({rows[0]['shape']})", ""]
        lines += render_table(rows, ceiling)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    data, returncode = run_suites(suite_files(args.ops), args)
    if not data or not data.get("benchmarks"):
        print(f"report.py: the benchmarks produced no results (pytest exit code {returncode})", file=sys.stderr)
        return returncode or 1
    groups = group_rows(data)
    first = data["benchmarks"][0]["extra_info"]
    device, dtype = first["device"], first["dtype"]
    ceiling = copy_bandwidth_ceiling() if device.startswith("cuda") else None
    load = max(load, os.getloadavg()[0])
    header = make_header(device, dtype, ceiling, data.get("machine_info", {}), load)
    header["keeps_freed_memory"] = bool(first.get("keeps_freed_memory"))
    markdown = render(groups, header)
    print(markdown)
    if device.startswith("cuda") or args.save:
        slug = re.sub(r"[^a-z0-9]+", "-", header["machine"].lower()).strip("-") if device.startswith("cuda") else "cpu"
        # One file per machine, date and set of suites, so saving one suite never overwrites another's results.
        suites = "-".join(args.ops) if args.ops else "all"
        stem = args.out / f"{slug}-{header['date']}-{suites}"
        args.out.mkdir(parents=True, exist_ok=True)
        # Every round's time would make the file tens of MB on a GPU (thousands of rounds per case); the
        # statistics stay.
        for bench in data["benchmarks"]:
            bench["stats"].pop("data", None)
        stem.with_suffix(".json").write_text(json.dumps({"kdfast_header": header, **data}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown)
        print(f"wrote {stem}.json and {stem}.md")
    if returncode != 0:
        print(f"report.py: some benchmarks failed (pytest exit code {returncode}); the tables show the rest",
              file=sys.stderr)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
