"""Throughput benchmark: model alone vs the whole pipeline vs a tutorial loop.

For each model, on the same generated images:
  model-only   Embedder.embed on preloaded uint8 tensors, with the pipeline's settings
  e2e-local    `batchsight run` in a subprocess, source and output in local folders
  e2e-s3       the same with both on moto's S3 server (real HTTP on 127.0.0.1)
  naive        PIL open -> torchvision transforms -> fp32 model, batch 32, one thread of work
and per-stage seconds (fetch, decode, model, wait, write, index) and peak RSS of
each run. Prints a table and writes JSON. Not a test: nothing here asserts a time.

    python benchmarks/throughput.py                         # resnet50 + resnet18, 1000 images
    python benchmarks/throughput.py --models resnet50 --rss-images 1000,5000
    python benchmarks/throughput.py --device cuda --batch-size 256 --gpu-decode
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.engine import Embedder, cpu_supports_bf16, default_batch_size, stack_images  # noqa: E402
from models.settings import EmbedderSettings  # noqa: E402
from tasks.sample_data import distinct_bytes, encode, make_document, make_product_photo  # noqa: E402
from tasks.shard.decode import decode_image  # noqa: E402
from tasks.shard.read import bounded_map  # noqa: E402
from tasks.storage import LocalStore, S3Store  # noqa: E402

MIX = {"jpeg-500x375": 0.70, "jpeg-4000x3000": 0.10, "png-document": 0.10, "png-640x480": 0.10}


def image_pool(seed: int = 0, unique: int = 200) -> list[tuple[str, bytes]]:
    """`unique` distinct images in the MIX proportions (kind, bytes)."""
    rng = np.random.default_rng(seed)
    pool = []
    for kind, share in MIX.items():
        for _ in range(max(1, round(unique * share))):
            if kind == "jpeg-500x375":
                data = encode(make_product_photo(rng, (500, 375)), "JPEG", quality=90)
            elif kind == "jpeg-4000x3000":
                data = encode(make_product_photo(rng, (4000, 3000)), "JPEG", quality=90)
            elif kind == "png-document":
                data = encode(make_document(rng, ("invoice", "receipt", "form")[len(pool) % 3]), "PNG")
            else:
                data = encode(make_product_photo(rng, (640, 480)), "PNG")
            pool.append((kind, data))
    order = rng.permutation(len(pool))
    return [pool[i] for i in order]


def write_set(store, pool: list[tuple[str, bytes]], n: int) -> None:
    """n objects cycling through the pool, each under its own key and with bytes of
    its own (`distinct_bytes`: the same pixels), so every object is fetched,
    decoded and embedded on its own (identical bytes are embedded once, issue 27)."""
    for i in range(n):
        kind, data = pool[i % len(pool)]
        store.put(f"{kind}/img-{i:06d}.{'png' if kind.startswith('png') else 'jpg'}", distinct_bytes(data, i))


def python_path() -> str:
    """This checkout first, then the caller's PYTHONPATH: packages brought along that
    way (wheels unpacked on a machine without a network) must reach `batchsight run`."""
    return os.pathsep.join([str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of that one process so far (Linux VmHWM); the Prefect
    server and compile workers it starts are separate processes and not counted."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def model_only(model: str, device: str, batch_size: int, compile_model: bool, pool, seconds: float = 12.0) -> dict:
    """Preloaded uint8 batches through the model streams, as the pipeline runs them
    (`Embedder.stream_pool`, `streams + 1` batches in flight)."""
    emb = Embedder(EmbedderSettings(model=model, weights="random:0", device=device))
    if compile_model:
        emb.enable_compile()
    tensors = [emb.preprocess(decode_image(d, min_side=emb.family.preprocessing.resize_size).image) for _, d in pool[:64]]
    batch = stack_images((tensors * (batch_size // len(tensors) + 1))[:batch_size])
    if emb.device.type == "cuda":
        batch = batch.to(emb.device)

    def run(b):
        return emb.embed(b, pad_to=batch_size)

    t0 = time.perf_counter()
    emb.warm_up(batch_size)  # compile
    list(emb.stream_pool().map(run, [batch] * emb.streams))
    warmup = time.perf_counter() - t0
    deadline = time.perf_counter() + seconds

    def batches():
        while time.perf_counter() < deadline:
            yield batch

    n, t0 = 0, time.perf_counter()
    for _ in bounded_map(emb.stream_pool(), run, batches(), max_in_flight=emb.streams + 1):
        n += batch_size
    if emb.device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": n / (time.perf_counter() - t0), "warmup_s": warmup,
            "dtype": str(emb.dtype).removeprefix("torch."), "streams": emb.streams,
            "threads_per_stream": emb.stream_threads}


def naive(model: str, pool, n: int) -> dict:
    """The loop a tutorial writes: one image at a time through PIL and the weights'
    transforms, fp32, batches of 32, nothing overlapped."""
    import io

    import torchvision
    from PIL import Image

    torch.manual_seed(0)
    net = torchvision.models.get_model(model).eval()
    transform = torchvision.models.get_model_weights(model).DEFAULT.transforms()
    t0 = time.perf_counter()
    done = 0
    with torch.no_grad():
        for start in range(0, n, 32):
            batch = [transform(Image.open(io.BytesIO(pool[i % len(pool)][1])).convert("RGB"))
                     for i in range(start, min(n, start + 32))]
            net(torch.stack(batch))
            done += len(batch)
    return {"images_per_s": done / (time.perf_counter() - t0), "images": done}


def e2e(model: str, source: str, device: str, batch_size: int | None, compile_model: bool, env: dict,
        gpu_decode: bool = False, extra_args: tuple[str, ...] = ()) -> dict:
    """`batchsight run` in a fresh process, with its peak RSS."""
    out = tempfile.mkdtemp(prefix="bs-bench-out-")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--source", source, "--output", out, "--model", model,
           "--weights", "random:0", "--device", device, "--compile", "on" if compile_model else "off", "--json"]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    if gpu_decode:
        cmd += ["--gpu-decode"]
    cmd += list(extra_args)
    logs = Path(out) / ".bench-logs"
    logs.mkdir()
    t0 = time.perf_counter()
    peak_kb = 0
    with open(logs / "stdout", "w") as so, open(logs / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=ROOT)
        while proc.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    stdout, stderr = (logs / "stdout").read_text(), (logs / "stderr").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"batchsight run failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return {
        "images_per_s": summary["images_per_s"],
        "images_per_s_whole_run": summary["processed"] / summary["elapsed_s"],
        "process_wall_s": wall,
        "processed": summary["processed"],
        "stage_s": summary["stage_s"],
        "batch_size": summary.get("batch_size"),
        "failed": summary.get("failed"),
        "bottleneck": summary.get("bottleneck"),
        "peak_rss_mb": peak_kb / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,resnet18", help="comma-separated, or none (RSS runs only)")
    parser.add_argument("--images", type=int, default=1000, help="images per end-to-end run")
    parser.add_argument("--rss-images", default="", help="e.g. 1000,5000: extra resnet50 local runs for peak RSS")
    parser.add_argument("--naive-images", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--compile", default="on", choices=["on", "off"])
    parser.add_argument("--gpu-decode", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--workdir", default=str(ROOT / "bench-data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = parser.parse_args()

    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print("generating the image pool ...", flush=True)
    pool = image_pool()
    sizes = sorted({args.images, *[int(x) for x in args.rss_images.split(",") if x]})
    sets = {}
    for n in sizes:
        folder = workdir / f"images-{n}"
        if not folder.exists() or sum(1 for _ in folder.rglob("*.*")) != n:
            write_set(LocalStore(folder, create=True), pool, n)
        sets[n] = str(folder)
    compile_model = args.compile == "on"
    batch_size = args.batch_size or default_batch_size(args.device)
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_bf16": cpu_supports_bf16(),
                           "torch": torch.__version__, "device": args.device},
               "mix": MIX, "batch_size": batch_size, "compile": compile_model, "models": {}}

    with prefect_test_harness(server_startup_timeout=120):
        env = dict(os.environ, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(),
                   PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PYTHONPATH=python_path())
        moto = None
        if not args.skip_s3:
            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per GET otherwise
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=5127, verbose=False)
            moto.start()
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                       AWS_ENDPOINT_URL="http://127.0.0.1:5127")
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")})
            boto3.client("s3").create_bucket(Bucket="bench")
            write_set(S3Store("bench", "images", endpoint_url=env["AWS_ENDPOINT_URL"]), pool, args.images)
        try:
            for model in [m for m in args.models.split(",") if m and m != "none"]:
                print(f"[{model}] model only ...", flush=True)
                r = {"model_only": model_only(model, args.device, batch_size, compile_model, pool)}
                print(f"[{model}] naive loop ...", flush=True)
                r["naive"] = naive(model, pool, args.naive_images)
                print(f"[{model}] end to end, local ...", flush=True)
                r["e2e_local"] = e2e(model, sets[args.images], args.device, args.batch_size, compile_model, env,
                                     args.gpu_decode)
                if moto:
                    print(f"[{model}] end to end, S3 ...", flush=True)
                    r["e2e_s3"] = e2e(model, "s3://bench/images", args.device, args.batch_size, compile_model, env,
                                      args.gpu_decode)
                results["models"][model] = r
            rss = {}
            for n in sizes if args.rss_images else []:
                print(f"[resnet50] peak RSS with {n} images ...", flush=True)
                rss[n] = e2e("resnet50", sets[n], args.device, args.batch_size, compile_model, env, args.gpu_decode)
            results["rss_scaling"] = rss
        finally:
            if moto:
                moto.stop()

    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")


def print_table(results: dict) -> None:
    mix = ", ".join(f"{int(v * 100)}% {k}" for k, v in results["mix"].items())
    machine = results["machine"]
    print(f"\nimage mix: {mix}; batch {results['batch_size']}; compile {results['compile']}; "
          f"{machine['device']}, {machine['cores']} cores ({machine['cpu']})")
    head = f"{'model':10} {'path':10} {'img/s':>8} {'vs model':>9} {'vs naive':>9} {'rss MB':>8}  stages (s)"
    print(head)
    print("-" * len(head))
    for model, r in results["models"].items():
        base, nv = r["model_only"]["images_per_s"], r["naive"]["images_per_s"]
        for path in ("model_only", "e2e_local", "e2e_s3", "naive"):
            if path not in r:
                continue
            x = r[path]
            stages = " ".join(f"{k.removesuffix('_s')}={v:.1f}" for k, v in x.get("stage_s", {}).items())
            rss = f"{x['peak_rss_mb']:.0f}" if x.get("peak_rss_mb") else ""
            print(f"{model:10} {path:10} {x['images_per_s']:8.1f} {x['images_per_s'] / base:9.2f} "
                  f"{x['images_per_s'] / nv:9.2f} {rss:>8}  {stages}")
    for n, x in results.get("rss_scaling", {}).items():
        print(f"peak RSS, resnet50, {n} images: {x['peak_rss_mb']:.0f} MB ({x['images_per_s']:.1f} img/s)")


if __name__ == "__main__":
    main()
