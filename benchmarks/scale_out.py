"""Scale-out benchmark: the same images through `batchsight run` with the shards
in one process, and on a local Dask cluster of N worker processes (`--workers N`).

Each configuration runs as its own `batchsight run --json` subprocess into a
fresh output (its own temporary Prefect server, as a user's run would start),
and reports: wall time of the command, the run's elapsed time, the seconds to
start the cluster and have its workers up (`cluster_start_s`), from submitting
the shards to the first embedded batch (`to_first_batch_s`: a worker imports the
flow's modules and loads the model on its first shard), model load seconds
summed over shards, and the overhead per shard against the in-process run. Not a test: nothing here asserts
a time.

    python benchmarks/scale_out.py                       # 400 images, resnet18, shards of 50, workers 2
    python benchmarks/scale_out.py --images 1000 --model resnet50 --workers 2 --shard-size 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.weights import save_random_weights  # noqa: E402
from tasks.sample_data import generate_samples, write_samples  # noqa: E402
from tasks.storage import LocalStore  # noqa: E402


def one_run(source: Path, output: Path, weights: Path, args, extra: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--source", str(source), "--output", str(output),
           "--model", args.model, "--weights", str(weights), "--shard-size", str(args.shard_size),
           "--compile", "off", "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    stage = summary["stage_s"]
    return {"runner": summary["runner"], "command_wall_s": wall, "elapsed_s": summary["elapsed_s"],
            "shards": summary["shards"], "processes": len(summary["shards_by_process"]),
            "models_built_per_process": summary["models_built"], "images_per_s": summary["images_per_s"],
            "cluster_start_s": stage.get("cluster_start_s"), "to_first_batch_s": stage.get("to_first_batch_s"),
            "load_s": stage.get("load_s"),
            "model_s": stage["model_s"], "decode_s": stage["decode_s"], "wait_s": stage["wait_s"],
            "processed": summary["processed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_out.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="batchsight-scale-") as tmp:
        tmp = Path(tmp)
        write_samples(LocalStore(tmp / "src", create=True), generate_samples(args.images, seed=7, broken=False))
        weights = tmp / f"{args.model}-random.pth"
        save_random_weights(args.model, 0, weights)
        env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="WARNING")
        rows = []
        for repeat in range(args.repeats):  # alternate, so drift in a shared machine's load hits both
            for name, extra in (("in-process", []), (f"local-cluster-{args.workers}", ["--workers", str(args.workers)])):
                row = one_run(tmp / "src", tmp / f"out-{name}-{repeat}", weights, args, extra, env)
                rows.append({"config": name, "repeat": repeat} | row)
                print(json.dumps(rows[-1]), flush=True)

    base = [r for r in rows if r["config"] == "in-process"]
    spread = [r for r in rows if r["config"] != "in-process"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    shards = base[0]["shards"]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "images": args.images, "model": args.model, "shard_size": args.shard_size, "workers": args.workers,
        "runs": rows,
        "summary": {
            "in_process_elapsed_s": mean(base, "elapsed_s"),
            "cluster_elapsed_s": mean(spread, "elapsed_s"),
            "cluster_over_in_process": mean(spread, "elapsed_s") / mean(base, "elapsed_s"),
            "overhead_per_shard_s": (mean(spread, "elapsed_s") - mean(base, "elapsed_s")) / shards,
            "cluster_start_s": mean(spread, "cluster_start_s"),
            "to_first_batch_in_process_s": mean(base, "to_first_batch_s"),
            "to_first_batch_cluster_s": mean(spread, "to_first_batch_s"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
