"""S3 faults benchmark: how much a faulty S3 slows `batchsight run`, and whether
the catalogue still comes out whole.

Runs the same bucket (on moto's server, real HTTP on 127.0.0.1) through
tests/fault_proxy.py three ways: clean, 20% 503 SlowDown, and 20% 503 + 5% 500 +
5% bodies cut short. Each run is `batchsight run` in a subprocess with ResNet-18
random weights; the time is the run's own `elapsed_s` (Prefect's server start is
left out). Prints a table and writes JSON. Not a test: nothing here asserts a time.

    python benchmarks/s3_faults.py --images 300 --out benchmarks/results/s3-faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.weights import save_random_weights  # noqa: E402
from tasks.sample_data import generate_samples, write_samples  # noqa: E402
from tasks.storage import S3Store  # noqa: E402
from tests.fault_proxy import FaultProxy, Faults  # noqa: E402

SCENARIOS = {
    "clean": Faults(),
    "503-20%": Faults(p503=0.2, seed=1),
    "503-20%+500-5%+cut-5%": Faults(p503=0.2, p500=0.05, p_cut=0.05, seed=2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "s3-faults.json")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="batchsight-s3-faults-"))
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
               PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="source")
    write_samples(S3Store("source", "photos", endpoint_url=endpoint), generate_samples(args.images, seed=5))
    weights = work / "resnet18.pth"
    save_random_weights("resnet18", 0, weights)

    results = {}
    for i, (name, faults) in enumerate(SCENARIOS.items()):
        client.create_bucket(Bucket=f"catalog-{i}")
        with FaultProxy(endpoint, faults) as proxy:
            proc = subprocess.run(
                [sys.executable, "-m", "flows.cli", "run", "--source", "s3://source/photos", "--output",
                 f"s3://catalog-{i}/cat", "--model", "resnet18", "--weights", str(weights), "--endpoint-url",
                 proxy.url, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: batchsight run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
        results[name] = {"elapsed_s": summary["elapsed_s"], "processed": summary["processed"],
                         "failed": summary["failed"], "failures": summary["failures_by_reason"],
                         "requests": proxy.requests, "injected": dict(proxy.injected)}
    moto.stop()
    clean = results["clean"]["elapsed_s"]
    print(f"{'scenario':<24} {'elapsed s':>9} {'x clean':>8} {'embedded':>8} {'failed':>6}  injected")
    for name, r in results.items():
        r["slowdown"] = r["elapsed_s"] / clean
        print(f"{name:<24} {r['elapsed_s']:>9.1f} {r['slowdown']:>8.2f} {r['processed']:>8} {r['failed']:>6}  "
              f"{r['injected']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": args.images, "cpu_count": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
