"""The GPU check: how close `batchsight run` comes to the model alone on one GPU
machine, against a plain DataLoader, on two image sets. Run it through
`benchmarks/device_check.sh` (which brings prefect, faiss, boto3 and pypdfium2
along as wheels where they are missing). Prints a table; writes JSON after every
step, so a run cut short still leaves what it measured.

Steps, in order of what matters (each skipped, and said so, once `--budget-s` is spent):
  probe          nvJPEG and CPU draft-mode decode of one 500x375 and one 4000x3000 JPEG
  model alone    Embedder.embed on preloaded batches: eager (and torch.compile with --compile on)
  runs           `batchsight run --gpu-decode` on 100,000 ImageNet-like JPEGs and on 20,000 of the mix
                 (10% 12-MP camera photos: the bucket that crashed the H200); after each run, which
                 processes hold the GPU (`nvidia-smi`): none of the run's may. With --cpu-decode also
                 the CPU-decode runs, with --shard-workers N also each with `--workers N`
  dataloader     DataLoader(num_workers=cores, pin_memory) + weights.transforms() + bf16 model, per set

Every object of a set has bytes of its own (`distinct_bytes`): identical bytes are
embedded once (issue 27), so repeated files would measure copies, not the model.

    python benchmarks/device_check.py --device cuda --out results.json     # issue 26's check
    python benchmarks/device_check.py --device cpu --images 200 --mix-images 100 --model resnet18  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402

from tasks.sample_data import distinct_bytes, encode, make_document, make_product_photo  # noqa: E402
from tasks.shard.decode import decode_image  # noqa: E402

IMAGENET = {"jpeg-500x375": 1.0}


def _make(spec: tuple[str, int]) -> bytes:
    kind, seed = spec
    rng = np.random.default_rng(seed)
    if kind == "jpeg-500x375":
        return encode(make_product_photo(rng, (500, 375)), "JPEG", quality=90)
    if kind == "jpeg-4000x3000":
        return encode(make_product_photo(rng, (4000, 3000)), "JPEG", quality=90)
    if kind == "png-document":
        return encode(make_document(rng, ("invoice", "receipt", "form")[seed % 3]), "PNG")
    return encode(make_product_photo(rng, (640, 480)), "PNG")


def make_set(folder: Path, mix: dict[str, float], n: int, unique: int = 200, seed: int = 0) -> dict:
    """`n` objects in the `mix` proportions, from `unique` distinct images made in
    parallel; each object is its own file with its own bytes (`distinct_bytes`), so every
    object is fetched, decoded and embedded on its own."""
    made = folder.parent / f"{folder.name}.made.json"  # beside the set: a file in it would be an object
    recipe = {"mix": mix, "n": n, "unique": unique, "seed": seed, "distinct": 1}
    if made.exists() and json.loads(made.read_text()) == recipe:
        return {"images": n, "made_s": 0.0}
    if folder.exists():  # made by another recipe (or before objects had bytes of their own)
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    kinds = [kind for kind, share in mix.items() for _ in range(max(1, round(unique * share)))]
    specs = [(kind, seed * 100_000 + i) for i, kind in enumerate(kinds)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        blobs = list(pool.map(_make, specs))
    order = np.random.default_rng(seed).permutation(len(specs))
    for i in range(n):
        j = order[i % len(order)]
        kind = specs[j][0]
        target = folder / kind / f"img-{i:06d}.{'png' if kind.startswith('png') else 'jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(distinct_bytes(blobs[j], i))
    made.write_text(json.dumps(recipe))
    return {"images": n, "unique": len(specs), "made_s": time.perf_counter() - t0,
            "bytes_per_image": sum(len(b) for b in blobs) / len(blobs)}


def gpu_holders(device: str, wait_s: float = 15.0) -> dict:
    """The processes holding GPU memory once a run has ended (`nvidia-smi`), waiting
    up to `wait_s` for them to go: none of the run's may be left (issue 26)."""
    if device != "cuda":
        return {}
    import subprocess

    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lines = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            return {"gpu_processes_after": f"nvidia-smi failed: {exc}"}
        holders = [line for line in lines if line and not line.startswith(f"{os.getpid()},")]
        if not holders or time.monotonic() > deadline:
            return {"gpu_processes_after": holders, "no_process_left": not holders}
        time.sleep(0.5)


def probe(device: str) -> dict:
    """What one JPEG costs each way: nvJPEG (batched) and a CPU core in draft mode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = {}
    rng = np.random.default_rng(5)
    for kind, size, batch in (("500x375", (500, 375), 128), ("4000x3000", (4000, 3000), 16)):
        data = encode(make_product_photo(rng, size), "JPEG", quality=90)
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 1.0:
            decode_image(data, min_side=232)
            n += 1
        row = {"cpu_draft_ms_per_core": 1000 * (time.perf_counter() - t0) / n}
        if device == "cuda":
            tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * batch
            cpu = decode_jpeg(tensors[0], mode=ImageReadMode.RGB)
            for _ in range(2):
                gpu = decode_jpeg(tensors, mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()
            row["nvjpeg_max_abs_diff_vs_cpu"] = int((gpu[0].cpu().int() - cpu.int()).abs().max())
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 1.0:
                decode_jpeg(tensors, mode=ImageReadMode.RGB, device="cuda")
                n += batch
            torch.cuda.synchronize()
            row["nvjpeg_images_per_s"] = n / (time.perf_counter() - t0)
        out[kind] = row
    return out


def model_alone(model: str, device: str, batch_size: int, compiled: bool, pool, seconds: float) -> dict:
    return throughput.model_only(model, device, batch_size, compiled, pool, seconds=seconds)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def dataloader_baseline(model: str, folder: Path, device: str, batch_size: int, seconds: float) -> dict:
    """The plain recipe: DataLoader(num_workers=cores, pin_memory) over the files,
    the weights' own transforms, a bf16 channels_last eager model. Each worker
    builds whole batches, so the first `workers` batches arrive together after a
    long start; the rate is timed from the first batch over at least two rounds of
    the workers and `seconds` (the start-up is reported apart)."""
    import torchvision

    paths = sorted(folder.rglob("*.*"))
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]  # the set's mix in every batch
    weights = torchvision.models.get_model_weights(model).DEFAULT
    net = torchvision.models.get_model(model).eval().to(device, memory_format=torch.channels_last)
    workers = os.cpu_count() or 1
    loader = torch.utils.data.DataLoader(_Files(paths, weights.transforms()), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device == "cuda")
    n, batches, t_start, t_first = 0, 0, time.perf_counter(), None
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        for batch in loader:
            x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            net(x)
            batches += 1
            if t_first is None:
                t_first = time.perf_counter()
                continue
            n += batch.shape[0]
            if batches > 2 * workers and time.perf_counter() - t_first > seconds:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": n / (time.perf_counter() - t_first) if n else 0.0, "images": n + batch_size,
            "first_batch_s": t_first - t_start, "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=100_000, help="ImageNet-like JPEGs")
    parser.add_argument("--mix-images", type=int, default=20_000, help="objects of the throughput mix")
    parser.add_argument("--only", default="", help="semicolon-separated parts of step names: run only those steps")
    parser.add_argument("--compile", default="off", choices=["on", "off"], help="for the runs")
    parser.add_argument("--cpu-decode", action="store_true", help="also the runs with CPU decoding")
    parser.add_argument("--unique", type=int, default=200, help="distinct images a set is made of")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's own choice")
    parser.add_argument("--model-seconds", type=float, default=8.0)
    parser.add_argument("--loader-seconds", type=float, default=20.0)
    parser.add_argument("--shard-workers", type=int, default=1,
                        help="also run each set with --workers N: N shard processes feeding the one device (1: not)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the steps left after this long")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bs-device-check"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_check.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    results: dict = {"machine": {"cpu": throughput.cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
                                 "torch": torch.__version__, "python": sys.version.split()[0]},
                     "model": args.model, "images_per_set": args.images, "mix": throughput.MIX, "steps": {},
                     "skipped": []}
    compiled_on = args.compile

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=2, default=str))

    only = [w for w in args.only.split(";") if w]

    def step(name: str, fn, *a, **kw) -> None:
        if only and not name.startswith("make ") and not any(w in name for w in only):
            return
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(name)
            print(f"[{time.perf_counter() - started:6.1f}s] {name}: skipped (budget spent)", flush=True)
            save()
            return
        print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results["steps"][name] = fn(*a, **kw) | {"step_s": time.perf_counter() - t0}
        except Exception as exc:  # a failed step is a result too; the others still run
            results["steps"][name] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
        print(f"         -> {json.dumps(results['steps'][name], default=str)[:600]}", flush=True)
        save()

    workdir = Path(args.workdir)
    mix_dir, imagenet_dir = workdir / "mix", workdir / "imagenet"
    step("probe", probe, args.device)
    step("make mix", make_set, mix_dir, throughput.MIX, args.mix_images, args.unique)
    step("make imagenet-like", make_set, imagenet_dir, IMAGENET, args.images, args.unique, seed=1)
    pool = throughput.image_pool(unique=16)
    batch = args.batch_size or (256 if args.device == "cuda" else 16)
    step("model alone, eager", model_alone, args.model, args.device, batch, False, pool, args.model_seconds)
    if args.compile == "on":
        step("model alone, compiled", model_alone, args.model, args.device, batch, True, pool, args.model_seconds)

    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        env = dict(os.environ, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(),
                   PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PYTHONPATH=throughput.python_path())

        def run(folder: Path, gpu_decode: bool) -> dict:
            return throughput.e2e(args.model, str(folder), args.device, args.batch_size, compiled_on == "on", env,
                                  gpu_decode) | gpu_holders(args.device)

        def run_on_workers(folder: Path, gpu_decode: bool) -> dict:
            # Eager: each worker would compile on its first batch, inside the timed shards.
            shards = ("--workers", str(args.shard_workers), "--shard-size", "20000")
            return throughput.e2e(args.model, str(folder), args.device, args.batch_size, False, env, gpu_decode,
                                  shards) | gpu_holders(args.device)

        gpu_decode = args.device == "cuda"
        on_workers = f", {args.shard_workers} shard processes"
        for name, folder in (("imagenet-like", imagenet_dir), ("mix", mix_dir)):
            if gpu_decode:
                step(f"run {name}, GPU decode", run, folder, True)
                if args.shard_workers > 1:
                    step(f"run {name}, GPU decode{on_workers}", run_on_workers, folder, True)
        for name, folder in (("imagenet-like", imagenet_dir), ("mix", mix_dir)):
            if args.cpu_decode or not gpu_decode:
                step(f"run {name}, CPU decode", run, folder, False)
                if args.shard_workers > 1:
                    step(f"run {name}, CPU decode{on_workers}", run_on_workers, folder, False)
    step("dataloader mix", dataloader_baseline, args.model, mix_dir, args.device, batch, args.loader_seconds)
    step("dataloader imagenet-like", dataloader_baseline, args.model, imagenet_dir, args.device, batch,
         args.loader_seconds)
    summarise(results)
    save()
    print_table(results)
    print(f"\nwrote {out}")


# issue 26: images a second, and how many times the DataLoader peer of the set (None: not asked)
TARGETS = {"run mix, GPU decode": (2500, None), "run imagenet-like, GPU decode": (8000, 3.0)}


def summarise(results: dict) -> None:
    """Each run against the model alone (compiled), the DataLoader baseline of its
    set, and the issue's target."""
    steps = results["steps"]
    model = (steps.get("model alone, compiled") or steps.get("model alone, eager", {})).get("images_per_s")
    for name, r in steps.items():
        if not name.startswith("run ") or "images_per_s" not in r:
            continue
        base = steps.get("dataloader " + ("mix" if "mix" in name else "imagenet-like"), {}).get("images_per_s")
        r["vs_model_alone_compiled"] = r["images_per_s"] / model if model else None
        r["vs_dataloader"] = r["images_per_s"] / base if base else None
        target = TARGETS.get(", ".join(name.split(", ")[:2]))  # the same with or without shard processes
        if target:
            rate, vs_loader = target
            r["target_images_per_s"], r["target_vs_dataloader"] = rate, vs_loader
            r["meets_target"] = (r["images_per_s"] >= rate and (vs_loader is None or (r["vs_dataloader"] or 0) >= vs_loader)
                                 and r.get("no_process_left", True))


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"\n{results['model']}, {results['images_per_set']} images a set; {m['gpu'] or 'cpu'}, {m['cores']} cores")
    print(f"{'step':50} {'img/s':>9} {'vs model':>9} {'vs loader':>10}  notes")
    for name, r in results["steps"].items():
        if "images_per_s" not in r:
            if "error" in r:
                print(f"{name:50} {'error':>9}  {r['error'][-200:]}")
            continue
        vm, vl = r.get("vs_model_alone_compiled"), r.get("vs_dataloader")
        notes = f"batch {r['batch_size']}; {r.get('bottleneck') or ''}"[:90] if "batch_size" in r else ""
        print(f"{name:50} {r['images_per_s']:9.1f} {vm or 0:9.2f} {vl or 0:10.1f}  {notes}")
    if results["skipped"]:
        print("skipped (time budget): " + ", ".join(results["skipped"]))


if __name__ == "__main__":
    main()
