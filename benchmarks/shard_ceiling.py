"""How many images a second one shard process can carry when the model and the
JPEG decoder cost nothing: the ceiling a GPU run meets once nvJPEG and the
model are fast (issue 13). Runs the real `process_shard` (fetch in decode
processes or threads, batching, the device-decode call, stacking, rows, the
embeddings part and its Parquet write) over ImageNet-like 500x375 JPEGs, with
two stand-ins, said here because they are not the product: a model that
returns unit vectors made once, at once (the copy a real model's output costs
to bring to the host), and nvJPEG plus the device resize handing on a batch of
model-sized images at no cost to this process (on a GPU that work is the
device's). Every object has bytes of its own (`device_check.make_set`).

`--processes 1,2` runs the set as 1 shard process, then as 2 side by side on
halves of it (what `batchsight run --workers 2` does), and reports the images a
second of each layout over the whole wall time, and the CPU each used. Each
process first runs an untimed shard of 1,024 objects: a process's first shard
also pays for starting its decode processes (about 1 s here). On the
H200 machine one shard process was the wall (its model busy 3 s of 15 s); this
shows whether a second process carries more on the same cores.

    python benchmarks/shard_ceiling.py --images 8000 --processes 1,2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARM_UP = 1024  # objects of an untimed first shard in each process
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def one_shard(folder: str, part: int, parts: int, decode_in: str, model: str, out: str) -> dict:
    """In a child process: one shard over every `parts`-th object of `folder`."""
    import numpy as np
    import torch

    import tasks.shard.embed as embed_stage
    import tasks.shard.runner as runner
    from models.engine import EmbedResult, get_embedder
    from models.settings import EmbedderSettings
    from tasks.shard.decode import DecodeOptions
    from tasks.storage import StoreSpec

    settings = EmbedderSettings(model, weights="random:0", device="cpu")
    real = get_embedder(settings)
    side = real.family.preprocessing.crop_size
    rng = np.random.default_rng(part)
    unit = rng.standard_normal((1024, real.dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    classes, probs = np.tile(np.arange(5, dtype=np.int32), (1024, 1)), np.full((1024, 5), 0.2, np.float32)

    class NullModel:  # stand-in: the real embedder's attributes, no network, results made once
        def __getattr__(self, name):
            return getattr(real, name)

        def embed(self, batch, **kw):
            n = batch.shape[0]
            return EmbedResult(unit[:n].copy(), classes[:n].copy(), probs[:n].copy())

        def fitting_batch_size(self):
            return 256

    class NullJpegDecoder:  # stand-in for nvJPEG
        def decode(self, jpegs):
            raise AssertionError("decode_on_device is a stand-in here")

    model_sized = torch.zeros(1024, 3, side, side, dtype=torch.uint8)

    def decode_on_device(jpegs, sizes, decoder, preprocess, budget):
        """Stand-in for nvJPEG and the device resize: what they hand on, a batch of
        model-sized images on the device, at no cost to this process."""
        return model_sized[:len(jpegs)], np.ones(len(jpegs), bool)

    runner.get_embedder = lambda *a, **k: NullModel()
    runner.device_jpeg_decoder = lambda device: NullJpegDecoder()
    embed_stage.decode_on_device = decode_on_device
    source = StoreSpec(folder)
    items = tuple(source.open().list())[part::parts]
    spec = runner.ShardSpec(index=part, items=items, source=source, output=StoreSpec(out), run_id="ceiling",
                            embedder=settings, batch_size=256,
                            decode=DecodeOptions(on_device=True, decode_in=decode_in))
    # A process's first shard also starts its decode processes and first-time code
    # paths (about 1 s here); a night runs many shards a process, so time a later one.
    runner.process_shard(replace(spec, items=items[:WARM_UP], index=parts + part))

    def cpu_s() -> float:  # this process's own CPU (its decode processes are not counted)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    cpu0, started = cpu_s(), time.time()
    result = runner.process_shard(spec)
    ended = time.time()
    return {"rows": len(result.rows), "started": started, "ended": ended, "cpu_s": cpu_s() - cpu0,
            "stage_s": {k: v for k, v in result.times.items() if k.endswith("_s")}}


def layout(folder: Path, processes: int, decode_in: str, model: str) -> dict:
    """`processes` shard processes side by side, each on its share of the set."""
    out = tempfile.mkdtemp(prefix="bs-ceiling-")
    cmd = [sys.executable, __file__, "--child", str(folder), "--decode-in", decode_in, "--model", model,
           "--out", out, "--parts", str(processes)]
    procs = [subprocess.Popen([*cmd, "--part", str(i)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(processes)]
    shards = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a shard process failed")
    wall = max(s["ended"] for s in shards) - min(s["started"] for s in shards)
    rows = sum(s["rows"] for s in shards)
    return {"images_per_s": rows / wall, "rows": rows, "wall_s": wall,
            "cpu_s_per_process": [round(s["cpu_s"], 2) for s in shards],
            "stage_s": [{k: round(v, 2) for k, v in s["stage_s"].items()} for s in shards]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--processes", default="1,2", help="comma-separated shard process counts")
    parser.add_argument("--rounds", type=int, default=3, help="each layout this many times, alternating")
    parser.add_argument("--decode-in", default="processes", choices=["processes", "threads"])
    parser.add_argument("--model", default="resnet50", help="its embedding size and labels (the network never runs)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bs-shard-ceiling"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shard_ceiling.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_shard(args.child, args.part, args.parts, args.decode_in, args.model, args.out)))
        return

    import device_check
    import throughput

    folder = Path(args.workdir) / "imagenet"
    device_check.make_set(folder, device_check.IMAGENET, args.images, seed=1)
    counts = [int(c) for c in args.processes.split(",")]
    runs: dict[str, list[dict]] = {str(c): [] for c in counts}
    for r in range(args.rounds):
        for c in counts:
            result = layout(folder, c, args.decode_in, args.model)
            runs[str(c)].append(result)
            print(f"round {r + 1}: {c} shard process(es): {result['images_per_s']:7.0f} img/s "
                  f"(cpu s per process {result['cpu_s_per_process']})", flush=True)
    medians = {c: sorted(x["images_per_s"] for x in rs)[len(rs) // 2] for c, rs in runs.items()}
    base = medians[str(counts[0])]
    report = {"machine": {"cpu": throughput.cpu_model(), "cores": os.cpu_count()}, "images": args.images,
              "model_dim_of": args.model, "decode_in": args.decode_in, "rounds": args.rounds,
              "median_images_per_s": medians, "vs_first": {c: m / base for c, m in medians.items()}, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median_images_per_s", "vs_first")}), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
