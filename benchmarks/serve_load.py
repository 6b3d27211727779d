"""Load test of `imgcls serve`: N concurrent single-image clients against batch prediction.

    .venv/bin/python benchmarks/serve_load.py RUN TEST_DIR [--clients 1,32,64] [--requests 400]
        [--engine auto] [--workers 1] [--max-batch 32] [--max-delay-ms 0] [--client asyncio|threads]

The server runs as its own process (`python -m imgcls serve`, loopback only); the load generator is
a second process (`python -c CLIENTS[...]`: N keep-alive connections on one asyncio loop, or N
httpx threads; one image per request), so on a 2-core machine it competes with the server for the
CPU, as it would on one host; its CPU seconds are printed per row. Every answer is checked against
`imgcls predict` on the same images (label equal, probability within 1e-5). Prints requests/s and
p50/p95/p99 latency per client count with the 1-minute load average before each row, next to the
batch throughput of prediction on the same images, the batches the server formed and where a
request's time went in the server (parse, decode, queue, forward, respond: from GET /model).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SERVER_START_S = 120
REQUEST_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "imgcls", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
               "--engine", args.engine, "--workers", str(args.workers),
               "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("server did not become healthy")


def batch_predict(run: Path, test_dir: Path, engine: str, out: Path) -> tuple[float, dict]:
    """`imgcls predict` wall time (cache already built by a first call) and its labels by id."""
    command = [sys.executable, "-m", "imgcls", "predict", str(run), str(test_dir), "--out", str(out),
               "--engine", engine]
    subprocess.run(command, check=True, capture_output=True)  # warm: decode cache, ONNX export
    t0 = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return seconds, {r[0]: r[1] for r in rows}


# The load generators. `asyncio` (the default): one event loop (uvloop when installed), one
# keep-alive connection per client, each request's bytes built once before the clock starts: about
# 0.1 ms of client CPU a request, so on a shared 2-core machine the server keeps most of the CPU.
# `threads`: one httpx client per thread, what a Python user would write first; it costs
# milliseconds of CPU a request, taken from the server. Both print the same JSON.
CLIENTS = {
    "threads": r'''
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import httpx
url, clients, requests, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
payloads = [(name, open(path, "rb").read()) for name, path in files]
local = threading.local()
def one(i):
    client = getattr(local, "client", None) or httpx.Client(timeout=%d)
    local.client = client
    name, data = payloads[i %% len(payloads)]
    t0 = time.perf_counter()
    response = client.post(url + "/predict", files=[("files", (name, data, "image/png"))], params={"k": 1})
    body = response.json() if response.status_code == 200 else None
    top = body["predictions"][0] if body else None
    return time.perf_counter() - t0, response.status_code, name, top and top["label"], top and top["probability"]
t0 = time.perf_counter()
with ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(one, range(requests)))
with open(sys.argv[5], "w") as out:
    json.dump({"seconds": time.perf_counter() - t0, "results": results}, out)
''' % REQUEST_TIMEOUT_S,
    "asyncio": r'''
import asyncio, itertools, json, sys, time
from urllib.parse import urlsplit
url, clients, requests, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
host, port = urlsplit(url).hostname, urlsplit(url).port
def request_bytes(name, data):
    body = (b"--imgclsload\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + name.encode()
            + b"\"\r\nContent-Type: image/png\r\n\r\n" + data + b"\r\n--imgclsload--\r\n")
    head = (f"POST /predict?k=1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary=imgclsload\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return name, head + body
payloads = [request_bytes(name, open(path, "rb").read()) for name, path in files]
counter = itertools.count()
results = [None] * requests
async def client():
    reader, writer = await asyncio.open_connection(host, port)
    while (i := next(counter)) < requests:
        name, raw = payloads[i %% len(payloads)]
        t0 = time.perf_counter()
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        seconds = time.perf_counter() - t0
        top = json.loads(body)["predictions"][0] if status == 200 else None
        results[i] = (seconds, status, name, top and top["label"], top and top["probability"])
    writer.close()
async def main():
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), %d)
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
t0 = time.perf_counter()
asyncio.run(main())
with open(sys.argv[5], "w") as out:
    json.dump({"seconds": time.perf_counter() - t0, "results": results}, out)
''' % max(REQUEST_TIMEOUT_S, 600),
}


def drive(url: str, clients: int, requests: int, files: list[tuple[str, str]], kind: str = "asyncio") -> dict:
    """Run the load generator to completion; its result plus its CPU seconds and the load before it."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        # The results go through a file: once, a 64-kB pipe read came back cut short mid-JSON.
        results = Path(tmp) / "results.json"
        subprocess.run([sys.executable, "-c", CLIENTS[kind], url, str(clients), str(requests), json.dumps(files),
                        str(results)], check=True, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only waited-for children: the client, not the server
        run = json.loads(results.read_text())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {**run, "client_cpu_s": cpu, "load": load}


def summarise(clients: int, run: dict, expected: dict, expected_p: dict) -> dict:
    latencies = np.array([r[0] for r in run["results"]])
    errors = sum(1 for r in run["results"] if r[1] != 200)
    wrong = sum(1 for r in run["results"] if r[1] == 200 and str(r[3]) != expected[Path(r[2]).stem])
    drift = max((abs(r[4] - expected_p[Path(r[2]).stem]) for r in run["results"] if r[1] == 200), default=0.0)
    return {"clients": clients, "requests": len(latencies), "req_s": len(latencies) / run["seconds"],
            "client_cpu_s": run["client_cpu_s"], "seconds": run["seconds"], "load": run["load"],
            "p50_ms": 1000 * np.percentile(latencies, 50), "p95_ms": 1000 * np.percentile(latencies, 95),
            "p99_ms": 1000 * np.percentile(latencies, 99), "errors": errors, "wrong": wrong, "max_dp": drift}


def reference_probabilities(run: Path, test_dir: Path, engine: str) -> dict:
    """The top probability of each image from batch prediction, to compare the server's with."""
    from imgcls.predict import load_predictor

    predictor = load_predictor(run, engine=engine, device="cpu")
    data = predictor.load(test_dir)
    proba = predictor.predict_proba(data.images)
    return {Path(i).stem: float(p.max()) for i, p in zip(data.ids, proba)}


def row_mean_batch(before: dict, after: dict) -> float | None:
    """Images per forward pass during one row, from two GET /model answers; None when they came from
    different worker processes (with --workers the kernel hands each connection to any of them) or
    from a worker that served none of the row's requests, since then they say nothing of the row."""
    if before.get("process") != after.get("process"):
        return None
    batches = after["batches"]["batches"] - before["batches"]["batches"]
    return (after["batches"]["images"] - before["batches"]["images"]) / batches if batches else None


def mean_batch_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("test_dir", type=Path, help="a test folder (test.csv + images/)")
    parser.add_argument("--clients", default="1,32,64")
    parser.add_argument("--requests", type=int, default=400, help="requests per client count")
    parser.add_argument("--images", type=int, default=200, help="distinct test images sent")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--workers", default="1", help="a number, or auto (imgcls serve --workers auto)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=0.0)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="asyncio",
                        help="load generator: asyncio (one event loop, raw keep-alive HTTP) or threads (httpx)")
    args = parser.parse_args()
    import httpx

    images = args.test_dir / "images"
    files = [(p.name, str(p)) for p in sorted(images.iterdir())[: args.images]]
    port = free_port()
    server = start_server(args.run, port, args)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        # The reference is batch prediction with the engine the server chose: `auto` may choose
        # another engine for a worker's share of the cores than for the whole machine.
        engine = httpx.get(f"{url}/model").json()["engine"]
        with tempfile.TemporaryDirectory() as tmp:
            seconds, labels = batch_predict(args.run, args.test_dir, engine, Path(tmp) / "submission.csv")
        expected = {Path(k).stem: v for k, v in labels.items()}
        expected_p = reference_probabilities(args.run, args.test_dir, engine)
        drive(url, 4, 20, files, args.client)  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            before = httpx.get(f"{url}/model").json()
            row = summarise(clients, drive(url, clients, args.requests, files, args.client), expected, expected_p)
            after = httpx.get(f"{url}/model").json()
            row["mean_batch"] = row_mean_batch(before, after)
            rows.append(row)
        model = httpx.get(f"{url}/model").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    from imgcls.runtime import cpu_kind, pick_device
    from imgcls.serve.app import auto_workers

    workers = auto_workers(pick_device()) if args.workers == "auto" else args.workers
    print(f"CPU: {cpu_kind()}; load average after: {os.getloadavg()[0]:.2f}; load generator: {args.client}")
    print(f"run {args.run} (engine {model['engine']}, {workers} worker(s) x {model['threads']} threads); "
          f"max batch {args.max_batch}, max delay {args.max_delay_ms} ms")
    print(f"imgcls predict: {len(labels)} images in {seconds:.2f}s = {len(labels) / seconds:.0f} img/s "
          "(process start and model load included)")
    print("| clients | requests | req/s | p50 ms | p95 ms | p99 ms | errors | wrong labels | max |dp| "
          "| client CPU s / wall s | load | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0]["req_s"] if rows else 1.0
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_s']:.1f} ({r['req_s'] / base:.2f}x) | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['wrong']} | {r['max_dp']:.1e} | "
              f"{r['client_cpu_s']:.1f} / {r['seconds']:.1f} | {r['load']:.1f} | {mean_batch_cell(r['mean_batch'])} |")
    print(f"server batches (one worker's): {model['batches']}")
    print(f"server time per request, ms (one worker's, all rows): {model['time_per_request_ms']}")


if __name__ == "__main__":
    main()
