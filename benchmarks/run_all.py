"""Run every benchmark, then gather their JSON results into one Markdown table.

    python benchmarks/run_all.py [--quick] [--only models,data,train,ablation,serve]

Each benchmark is its own script (`benchmarks/<name>.py`) that measures a baseline in the same
run and writes `benchmarks/results/<name>.json` with a `table` (Markdown) and the raw numbers;
this runner calls them one after the other (they are sized for a 2-core machine and must not
compete for cores), then writes `benchmarks/results/README.md` with every table and the machine
it ran on, and copies those tables into the project README (between its benchmark markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = {
    "models": "models.py",
    "data": "data.py",
    "train": "train.py",
    "ablation": "c2d_ablation.py",
    "serve": "serve.py",
}
RESULT_FILES = {"models": "models.json", "data": "data.json", "train": "train.json",
                "ablation": "c2d_ablation.json", "serve": "serve.json"}


def machine() -> str:
    try:
        import torch

        torch_v = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - the summary must still be written
        torch_v, gpu = "?", "?"
    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except Exception:  # noqa: BLE001
        pass
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}){mem}, {gpu}; Python {platform.python_version()}, torch {torch_v}"


README = HERE.parent / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def update_readme(lines: list[str]) -> bool:
    """Put the collected tables into the project README between BEGIN and END (headings one
    level down, under its Benchmarks section). False when the README has no such markers."""
    if not README.is_file():
        return False
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    rows = "\n".join(lines).split("\n")
    body = "\n".join("#" + line if line.startswith("#") else line for line in rows).strip()
    README.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smaller sizes)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    ap.add_argument("--collect-only", action="store_true", help="only rebuild results/README.md from the JSON files")
    args = ap.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.collect_only:
        for name in names:
            cmd = [sys.executable, str(HERE / BENCHES[name])] + (["--quick"] if args.quick else [])
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd, cwd=HERE.parent)
            print(f"=== {name}: exit {rc} after {time.time() - t0:.0f}s", flush=True)
            if rc != 0:
                failed.append(name)
    lines = ["# Benchmark results", "", f"Measured on: {machine()}.",
             f"Written by `python benchmarks/run_all.py{' --quick' if args.quick else ''}"
             f"{' --collect-only' if args.collect_only else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Ratios compare against a baseline measured "
             "in the same run." + (" Collected from each benchmark's last JSON (see each table's own run notes)."
                                     if args.collect_only else ""), ""]
    for name in BENCHES:
        path = RESULTS / RESULT_FILES[name]
        lines.append(f"## {name}")
        if not path.is_file():
            lines += ["", "(not run)", ""]
            continue
        data = json.loads(path.read_text())
        lines += ["", data.get("table", "(no table in the JSON)"), ""]
        if data.get("machine"):
            lines += [f"_Machine: {data['machine']}_", ""]
    (RESULTS / "README.md").write_text("\n".join(lines))
    print(f"\nwrote {RESULTS / 'README.md'}")
    if update_readme(lines[2:]):
        print(f"updated the tables in {README}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
