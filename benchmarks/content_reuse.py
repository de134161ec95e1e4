"""What a copied source costs (issue 27): a folder of ImageNet-like JPEGs is
catalogued, copied as `cp -r` does (new mtimes, so new ETags), and the copy
catalogued into a new catalogue seeded from the first (`--seed`). The second run
fetches and hashes every object and embeds none. Both runs go through the CLI's
`run_catalog` in one process (the temporary Prefect server starts once, for the
first), and each is timed by its own summary (`elapsed_s`).

    python benchmarks/content_reuse.py --images 5000 --model resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.cli.run import run_catalog  # noqa: E402
from tasks.config import config_from_flat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bs-content-reuse"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "content_reuse.json"))
    args = parser.parse_args()

    import device_check
    import throughput

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    photos, copy = work / "photos", work / "photos-copy"
    device_check.make_set(photos, device_check.IMAGENET, args.images, seed=3)  # every object its own bytes
    common = {"model": args.model, "weights": "random:0", "compile": "off"}
    first = run_catalog(config_from_flat(source=str(photos), output=str(work / "cat-a"), **common),
                        show_progress=False)
    shutil.copytree(photos, copy, copy_function=shutil.copy)  # as cp -r: new mtimes, new ETags
    second = run_catalog(config_from_flat(source=str(copy), output=str(work / "cat-b"), seed=str(work / "cat-a"),
                                          **common), show_progress=False)
    report = {
        "machine": {"cpu": throughput.cpu_model(), "cores": os.cpu_count(), "load": os.getloadavg()},
        "images": args.images, "model": args.model,
        "first": {"elapsed_s": first.elapsed_s, "processed": first.processed, "reused": first.reused,
                  "stage_s": first.stage_s},
        "second": {"elapsed_s": second.elapsed_s, "processed": second.processed, "reused": second.reused,
                   "stage_s": second.stage_s},
        "second_vs_first": second.elapsed_s / first.elapsed_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"first run {first.elapsed_s:.1f} s ({first.processed} embedded); copy seeded from it "
          f"{second.elapsed_s:.1f} s ({second.reused} of {second.processed} reused by content): "
          f"{report['second_vs_first']:.1%} of the first\nwrote {args.out}")


if __name__ == "__main__":
    main()
