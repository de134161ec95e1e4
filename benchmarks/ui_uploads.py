"""Memory of the search page under concurrent uploads (issue 29, item 1; not a test).

Builds (once, under --root) a synthetic catalogue whose manifest names resnet18
with seeded random weights (committed through the real build and commit code, as
ui_load.py does), starts the real `batchsight ui` on it in its own process, warms
it with one small upload (the model loads), then for each case sends
--concurrent uploads at once and follows the server's resident memory: VmHWM
(the kernel's peak, reset before each case through /proc/PID/clear_refs) and
VmRSS sampled every 10 ms, each over the idle VmRSS measured just before the
case. Cases:

  png169   13000x13000 RGB PNG (169 MP in ~0.5 MB: the issue's upload)
  rgba169  13000x13000 RGBA PNG (alpha: the costliest decode, ~13 bytes a pixel)
  jpeg169  13000x13000 JPEG (decoded in draft mode at 1/8 a side)
  budget   PNGs (RGBA) just under the decode budget: one decodes, the rest wait their turn (429)
  small    1000x1000 PNGs: all decode at once

Prints a table and writes JSON to benchmarks/results/ui_uploads.json.

    .venv/bin/python benchmarks/ui_uploads.py                      # 8 at once, the default budget (48 MP)
    .venv/bin/python benchmarks/ui_uploads.py --cases png169 --concurrent 1 --decode-budget-mp 10000 \\
        --out benchmarks/results/ui_uploads-unbudgeted.json        # one upload with no budget: what it cost before
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ui_load import _shown, build_catalogue, free_port, start_server  # noqa: E402

SIDE = 13_000
CASES = ("png169", "rgba169", "jpeg169", "budget", "small")


def png_of(width: int, height: int, channels: int) -> bytes:
    """A valid PNG of one flat colour, compressed row by row (never the whole image in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    colour_type = {3: 2, 4: 6}[channels]
    row = b"\x00" + bytes([120, 80, 200, 255][:channels]) * width
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def upload_for(case: str, budget_mp: float) -> tuple[bytes, str]:
    if case == "png169":
        return png_of(SIDE, SIDE, 3), "image/png"
    if case == "rgba169":
        return png_of(SIDE, SIDE, 4), "image/png"
    if case == "jpeg169":
        return jpeg_of(SIDE, SIDE), "image/jpeg"
    if case == "budget":
        side = int((budget_mp * 1e6 * 0.99) ** 0.5)
        return png_of(side, side, 4), "image/png"
    return png_of(1000, 1000, 3), "image/png"


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


def post(port: int, body: bytes, content_type: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/api/search/image?k=5", body=body, headers={"content-type": content_type})
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, time.perf_counter() - t0, text[:160]
    finally:
        conn.close()


def run_case(pid: int, port: int, case: str, body: bytes, content_type: str, concurrent: int) -> dict:
    time.sleep(1.0)
    idle = proc_status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    peak_sampled = idle
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_sampled
        while not stop.is_set():
            peak_sampled = max(peak_sampled, proc_status(pid, "VmRSS"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        answers = list(pool.map(lambda _: post(port, body, content_type), range(concurrent)))
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join()
    hwm = proc_status(pid, "VmHWM")
    time.sleep(1.0)
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"case": case, "concurrent": concurrent, "upload_bytes": len(body), "idle_mib": idle,
            "peak_mib": max(hwm, peak_sampled), "peak_over_idle_mib": max(hwm, peak_sampled) - idle,
            "sampled_peak_mib": peak_sampled, "after_mib": proc_status(pid, "VmRSS"), "statuses": statuses,
            "seconds": round(elapsed, 2), "slowest_s": round(max(a[1] for a in answers), 2),
            "examples": sorted({a[2] for a in answers})[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"some of {', '.join(CASES)}")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--decode-budget-mp", type=float, default=None, help="the server's --decode-budget-mp "
                        "(default: its own default)")
    parser.add_argument("--images", type=int, default=2_000,
                        help="catalogue size (the memory measured is the uploads')")
    parser.add_argument("--root", type=Path, default=ROOT / "bench-data" / "ui-uploads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ui_uploads.json")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(CASES)}")

    root = args.root / f"n{args.images}-resnet18"
    build_catalogue(root, args.images, 512, model="resnet18", weights="random:0")
    port = free_port()
    command = ["batchsight", "ui", "--catalog", str(root), "--port", str(port)]
    if args.decode_budget_mp is not None:
        command += ["--decode-budget-mp", str(args.decode_budget_mp)]
    budget_mp = args.decode_budget_mp or 48.0
    rows = []
    server = start_server(command, port)
    try:
        warm = post(port, png_of(640, 480, 3), "image/png")
        if warm[0] != 200:
            raise SystemExit(f"the warm-up upload failed: {warm}")
        for case in cases:
            body, content_type = upload_for(case, budget_mp)
            rows.append(run_case(server.pid, port, case, body, content_type, args.concurrent))
            print(f"{case}: {rows[-1]['statuses']} peak +{rows[-1]['peak_over_idle_mib']} MiB", flush=True)
    finally:
        server.terminate()
        server.wait(30)

    print(f"{'case':>8} {'at once':>8} {'upload KB':>10} {'idle MiB':>9} {'peak MiB':>9} {'+MiB':>6} "
          f"{'after MiB':>10} {'answers':>22} {'s':>6}")
    for r in rows:
        answers = " ".join(f"{k}x{v}" for k, v in sorted(r["statuses"].items()))
        print(f"{r['case']:>8} {r['concurrent']:>8} {r['upload_bytes'] // 1024:>10} {r['idle_mib']:>9} "
              f"{r['peak_mib']:>9} {r['peak_over_idle_mib']:>6} {r['after_mib']:>10} {answers:>22} {r['seconds']:>6}")
    report = {"server": " ".join(_shown(c) for c in command), "decode_budget_mp": budget_mp, "rows": rows,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "target": "peak within 1 GiB of idle for 8 concurrent 169 MP uploads"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
