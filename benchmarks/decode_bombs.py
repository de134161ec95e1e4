"""Peak RSS of `batchsight run` on document bombs (issue 10): small files that
decode to huge documents. Each bomb is the only object of its own source folder,
run in a fresh process under `/usr/bin/time -v`; a single ordinary photo gives the
baseline (Python, torch, the model and Prefect), and a last run takes every bomb at
once on several decode threads. Prints a table and writes JSON. Not a test:
nothing here asserts a number.

    .venv/bin/python benchmarks/decode_bombs.py                      # resnet50, random weights
    .venv/bin/python benchmarks/decode_bombs.py --model resnet18 --io-workers 8

Before the fix (issue 10): the 1-page PDF peaked at 8 GB, the 4-page PDF at 9 GB
and the TIFF at 6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sample_data import document_bombs, encode, make_product_photo  # noqa: E402


def run_under_time(source: Path, output: Path, args: argparse.Namespace, env: dict) -> dict:
    """One `batchsight run` under /usr/bin/time -v: its summary, peak RSS and wall time."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "flows.cli", "run", "--source", str(source),
           "--output", str(output), "--model", args.model, "--weights", "random:0", "--compile", "off",
           "--io-workers", str(args.io_workers), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"batchsight run on {source} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    if not peak or not wall:
        raise RuntimeError(f"no peak RSS in the output of /usr/bin/time -v:\n{proc.stderr[-2000:]}")
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.group(1).split(":"))))
    summary = json.loads(proc.stdout)
    return {"peak_rss_mb": int(peak.group(1)) / 1024, "wall_s": seconds, "status": summary["status"],
            "objects": summary["processed"], "pages": summary.get("pages", summary["processed"]),
            "failed": summary["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--io-workers", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed for one run")
    parser.add_argument("--workdir", default=None, help="where sources and catalogues go (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_bombs.json"))
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is needed (apt-get install time)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bs-bombs-"))
    env = dict(os.environ, PREFECT_HOME=str(workdir / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)  # each run starts its own temporary Prefect server
    files = {"baseline-photo-640x480.jpg": encode(make_product_photo(np.random.default_rng(0), (640, 480)), "JPEG"),
             **document_bombs()}
    cases = {name: {name: data} for name, data in files.items()}
    cases["all bombs at once"] = {name: data for name, data in files.items() if not name.startswith("baseline")}

    rows = []
    for label, contents in cases.items():
        source = workdir / "sources" / re.sub(r"\W+", "-", label)
        source.mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            (source / name).write_bytes(data)
        result = run_under_time(source, workdir / "catalogs" / source.name, args, env)
        rows.append({"case": label, "bytes": sum(len(d) for d in contents.values()), **result})
        print(f"{label}: {result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    base = rows[0]["peak_rss_mb"]
    print(f"\nbatchsight run, {args.model} (random weights), --io-workers {args.io_workers}, "
          f"{os.cpu_count()} cores; peak RSS from /usr/bin/time -v\n")
    print(f"{'case':<30} {'bytes':>10} {'pages':>6} {'failed':>7} {'peak RSS MB':>12} {'vs base MB':>11} "
          f"{'wall s':>7}")
    for r in rows:
        print(f"{r['case']:<30} {r['bytes']:>10,} {r['pages']:>6} {r['failed']:>7} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_mb'] - base:>+11.0f} {r['wall_s']:>7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "decode_bombs", "model": args.model, "io_workers": args.io_workers,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": rows,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
