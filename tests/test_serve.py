"""The HTTP server for real: uvicorn on loopback, good and bad uploads, concurrency, and a browser."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from conftest import HANG_S
from deploy_support import train_tiny_run
from imgcls.predict import OnnxPredictor, Predictor, load_predictor
from imgcls.serve.app import create_app
from imgcls.serve.uploads import UploadLimits

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json() == {"status": "ok"}:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not healthy after {timeout}s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run, its test images as files, and what batch prediction says about each."""
    run, data = train_tiny_run(tmp_path_factory.mktemp("serve"))
    predictor = Predictor.from_run(run, device="cpu", precision="fp32")
    dataset = predictor.load(data / "test")
    probabilities = predictor.predict_proba(dataset.images)
    files = [data / "test" / "images" / (i if i.endswith(".png") else f"{i}.png") for i in dataset.ids]
    names = [predictor.classes.names[i] for i in probabilities.argmax(1)]
    return {"run": run, "data": data, "files": files, "names": names, "probabilities": probabilities}


@contextmanager
def serve_process(run: Path, *options: str):
    """`imgcls serve` as a separate process on a free loopback port: (url, process). The start
    allows a busy machine minutes: the process imports torch and loads the model (each worker does)."""
    port = free_port()
    env = {**os.environ, "IMGCLS_HOME": str(run.parent / "imgcls_home")}
    process = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", str(run), "--host", "127.0.0.1",
                                "--port", str(port), "--device", "cpu", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:  # still starting its workers
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(trained: dict) -> str:
    """One server process on the torch engine (one worker: /model then describes every request)."""
    with serve_process(trained["run"], "--engine", "torch", "--workers", "1") as (url, _):
        yield url


@contextmanager
def thread_server(app) -> str:
    """uvicorn in a thread on a socket bound to loopback port 0 (no port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=HANG_S)
        sock.close()


def post(url: str, files: list, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=files, timeout=HANG_S, **kwargs)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_model_and_page(server: str, trained: dict) -> None:
    info = httpx.get(f"{server}/model").json()
    assert info["model"] == "scratch-cnn-tiny" and info["engine"] == "torch"
    assert [c["name"] for c in info["classes"]] == ["bar", "circle", "square"]
    assert info["input"] == {"channels": 1, "size": [16, 16], "model_input_size": [16, 16]}
    assert info["config_hash"] and info["source_run"] == str(trained["run"])
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the internet


def test_model_reports_where_the_time_of_a_request_goes(server: str, trained: dict) -> None:
    for f in trained["files"][:3]:
        assert post(server, [("files", (f.name, f.read_bytes(), "image/png"))]).status_code == 200
    info = httpx.get(f"{server}/model").json()
    phases = info["time_per_request_ms"]
    assert list(phases) == ["requests", "parse", "decode", "queue", "forward", "respond"]
    assert phases["requests"] >= 3 and phases["forward"] > 0 and phases["decode"] > 0
    assert info["batches"]["requests"] >= 3 and info["batches"]["forward_ms_per_batch"] > 0


def test_workers_each_hold_a_model_and_their_share_of_the_cores(trained: dict) -> None:
    with serve_process(trained["run"], "--engine", "torch", "--workers", "2") as (url, process):
        pids = set()
        for f in trained["files"][:8]:
            with httpx.Client() as client:  # a new connection each time, so the kernel may pick either worker
                body = client.post(f"{url}/predict", files=[("files", (f.name, f.read_bytes(), "image/png"))]).json()
                pids.add(client.get(f"{url}/model").json()["process"])
            assert body["predictions"][0]["name"] == trained["names"][trained["files"].index(f)]
        info = httpx.get(f"{url}/model").json()
    assert process.pid not in pids  # answered by worker processes, not the parent
    assert info["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (16, 4)])
def test_auto_workers_take_one_core_each_up_to_four_and_one_process_on_a_gpu(
        trained: dict, monkeypatch, cores: int, expected: int) -> None:
    import json

    import torch

    from imgcls.serve import app

    started = {}
    monkeypatch.setattr(app, "usable_cores", lambda: cores)
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: started.update(kw))
    monkeypatch.setenv(app.WORKER_SETTINGS, "")  # restored (removed) after the test; serve() sets it
    app.serve(trained["run"], engine="torch", device="cpu", workers="auto")
    assert started.get("workers", 1) == expected
    if expected > 1:  # the workers' settings: each its share of the cores
        assert json.loads(os.environ[app.WORKER_SETTINGS])["threads"] == cores // expected
    assert app.auto_workers(torch.device("cuda")) == 1


def test_workers_must_be_a_count_or_auto_and_default_to_auto(trained: dict, capsys) -> None:
    from imgcls.cli import build_parser, main

    assert build_parser().parse_args(["serve", str(trained["run"])]).workers == "auto"

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(trained["run"]), "--workers", "two"])
    assert exit_info.value.code == 2 and "expected a number of processes or auto, not 'two'" in capsys.readouterr().err


def test_predict_many_files_matches_batch_prediction(server: str, trained: dict) -> None:
    files = [("files", (f.name, f.read_bytes(), "image/png")) for f in trained["files"][:6]]
    body = post(server, files, params={"k": 2}).json()
    assert [p["filename"] for p in body["predictions"]] == [f.name for f in trained["files"][:6]]
    for i, prediction in enumerate(body["predictions"]):
        assert prediction["name"] == trained["names"][i]
        assert len(prediction["top"]) == 2
        assert prediction["top"][0]["probability"] >= prediction["top"][1]["probability"]
        assert prediction["probability"] == pytest.approx(trained["probabilities"][i].max(), abs=1e-5)
    # k larger than the class count is clamped, probabilities of all classes sum to one.
    top = post(server, files[:1], params={"k": 50}).json()["predictions"][0]["top"]
    assert len(top) == 3 and sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)


def test_other_sizes_and_modes_are_decoded_like_training(server: str, trained: dict) -> None:
    """An RGB JPEG upload at another size is converted and resized the same way as a dataset file."""
    grey = np.asarray(Image.open(trained["files"][0]))
    big = Image.fromarray(grey).convert("RGB").resize((64, 64), Image.NEAREST)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    body = post(server, [("files", ("big.jpg", buffer.getvalue(), "image/jpeg"))]).json()
    assert body["predictions"][0]["name"] == trained["names"][0]


def bad_uploads(good: bytes) -> list[tuple[str, dict, int, str]]:
    """(case, request kwargs, expected status, words the error must contain)."""
    bomb = png_bytes(np.zeros((4200, 4200), np.uint8))  # 17.6 Mpx, only a few kB compressed
    ppm = io.BytesIO()
    Image.new("L", (16, 16)).save(ppm, format="PPM")
    return [
        ("not an image", {"files": [("files", ("notes.png", b"hello, not pixels", "image/png"))]}, 415, "not an image"),
        ("truncated", {"files": [("files", ("cut.png", good[: len(good) // 2], "image/png"))]}, 400, "truncated"),
        ("empty", {"files": [("files", ("empty.png", b"", "image/png"))]}, 400, "empty"),
        ("wrong field", {"files": [("image", ("a.png", good, "image/png"))]}, 400, "'files'"),
        ("text not file", {"files": [("files", (None, b"a.png"))]}, 400, "not a file"),
        ("too many bytes", {"files": [("files", ("huge.png", good + b"\0" * (8 * 1024 * 1024), "image/png"))]},
         413, "byte limit"),
        ("too many pixels", {"files": [("files", ("bomb.png", bomb, "image/png"))]}, 413, "pixel"),
        ("format not allowed", {"files": [("files", ("a.ppm", ppm.getvalue(), "image/x-ppm"))]}, 415, "PPM"),
        ("too many files", {"files": [("files", (f"{i}.png", good, "image/png")) for i in range(33)]}, 413, "limit"),
        ("json body", {"json": {"files": ["a.png"]}}, 415, "multipart"),
        ("no body", {}, 415, "multipart"),
        ("k out of range", {"files": [("files", ("a.png", good, "image/png"))], "params": {"k": 0}}, 422, "k"),
    ]


def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(server: str, trained: dict) -> None:
    good = trained["files"][0].read_bytes()
    for case, kwargs, status, words in bad_uploads(good):
        response = httpx.post(f"{server}/predict", timeout=HANG_S, **kwargs)
        assert response.status_code == status, (case, response.status_code, response.text)
        detail = response.json()["detail"]
        assert words in detail and "Traceback" not in detail, (case, detail)
    # Still alive, still right.
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    body = post(server, [("files", ("ok.png", good, "image/png"))]).json()
    assert body["predictions"][0]["name"] == trained["names"][0]


def test_concurrent_requests_all_answered_correctly(server: str, trained: dict) -> None:
    payloads = [(f.name, f.read_bytes()) for f in trained["files"]]
    jobs = [i % len(payloads) for i in range(200)]
    local = threading.local()

    def one(index: int) -> tuple[int, float, dict]:
        client = getattr(local, "client", None) or httpx.Client(timeout=HANG_S)
        local.client = client
        name, data = payloads[index]
        t0 = time.perf_counter()
        response = client.post(f"{server}/predict", files=[("files", (name, data, "image/png"))])
        return index, time.perf_counter() - t0, response.json() if response.status_code == 200 else response.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    for index, _, body in answers:
        assert isinstance(body, dict), body
        prediction = body["predictions"][0]
        assert prediction["filename"] == payloads[index][0]
        assert prediction["name"] == trained["names"][index]
        assert prediction["probability"] == pytest.approx(trained["probabilities"][index].max(), abs=1e-5)
    latencies = np.array([seconds for _, seconds, _ in answers]) * 1000
    print(f"\n200 requests / 16 threads: {wall:.2f}s wall, {200 / wall:.0f} req/s, "
          f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms")


def test_onnx_engine_and_request_body_limit(trained: dict, tmp_path: Path) -> None:
    """In-process server on the ONNX engine with small limits: same answers; oversized bodies get 413."""
    predictor = OnnxPredictor.from_run(trained["run"])
    limits = UploadLimits(max_request_bytes=64 * 1024)
    with thread_server(create_app(predictor, limits)) as url:
        files = [("files", (f.name, f.read_bytes(), "image/png")) for f in trained["files"]]
        body = post(url, files).json()
        assert body["engine"] == "onnx"
        assert [p["name"] for p in body["predictions"]] == trained["names"]
        big = trained["files"][0].read_bytes() + b"\0" * (70 * 1024)
        response = post(url, [("files", ("big.png", big, "image/png"))])
        assert response.status_code == 413 and "byte limit" in response.json()["detail"]

        def chunks():  # chunked transfer: no Content-Length, the limit still holds
            boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
            yield boundary
            for _ in range(20):
                yield b"\0" * 8192
            yield b"\r\n--xyz--\r\n"

        response = httpx.post(f"{url}/predict", content=chunks(), timeout=HANG_S,
                              headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert response.status_code == 413, response.text
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_browser_upload_shows_the_predicted_label(server: str, trained: dict) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.set_default_timeout(HANG_S * 1000)  # a busy machine may take minutes; only a hang waits longer
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server, "blob:")) else None)
            page.goto(server)
            page.wait_for_function("document.getElementById('model-info').textContent.includes('scratch-cnn-tiny')")
            page.set_input_files("#file-input", [str(f) for f in trained["files"][:3]])
            page.wait_for_function("document.querySelectorAll('.result .top1').length === 3")
            shown = {page.locator(".result .file").nth(i).inner_text(): page.locator(".result .top1").nth(i).inner_text()
                     for i in range(3)}
            expected = {f.name: name for f, name in zip(trained["files"][:3], trained["names"][:3])}
            assert shown == expected
            assert page.locator(".result").first.locator(".row").count() == 3  # top-3 per image
            page.set_input_files("#file-input", files=[{"name": "oops.png", "mimeType": "image/png",
                                                         "buffer": b"not an image"}])
            page.wait_for_selector(".result .error")
            assert "not an image" in page.locator(".result .error").first.inner_text()
            page.screenshot(path="/tmp/serve.png", full_page=True)
            assert outside == []
        finally:
            browser.close()


def test_served_tta_matches_batch_tta(trained: dict) -> None:
    """A server started with flip TTA answers what predict_proba with flip TTA says."""
    predictor = load_predictor(trained["run"], device="cpu", tta="flip")
    expected = predictor.predict_proba(predictor.load(trained["data"] / "test").images)
    with thread_server(create_app(predictor)) as url:
        assert httpx.get(f"{url}/model").json()["tta"] == "flip"
        files = [("files", (f.name, f.read_bytes(), "image/png")) for f in trained["files"]]
        body = post(url, files).json()
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(expected.max(1), abs=1e-5)


class GatedPredictor:
    """Wraps a predictor; every forward pass waits for `gate` and counts its images."""

    def __init__(self, predictor):
        self.inner, self.gate, self.entered, self.batches = predictor, threading.Event(), threading.Event(), []
        self.waiting = 0  # images in the forward pass that waits at the gate

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_proba(self, images, batch_size: int = 512):
        self.waiting = len(images)
        self.entered.set()
        self.gate.wait(HANG_S)
        self.batches.append(len(images))
        return self.inner.predict_proba(images, batch_size)


def test_concurrent_requests_share_forward_passes_and_health_never_waits(trained: dict) -> None:
    from imgcls.serve.app import Batching

    gated = GatedPredictor(load_predictor(trained["run"], device="cpu"))
    files = trained["files"][:8]
    app = create_app(gated, batching=Batching(max_batch=8, max_delay_ms=200))
    with thread_server(app) as url:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, url, [("files", (f.name, f.read_bytes(), "image/png"))]) for f in files]
            assert gated.entered.wait(HANG_S)
            deadline = time.monotonic() + HANG_S
            while gated.waiting + app.state.batcher.queue.qsize() < 8 and time.monotonic() < deadline:
                time.sleep(0.01)  # every request is in the blocked pass or queued behind it
            assert httpx.get(f"{url}/health", timeout=HANG_S).json() == {"status": "ok"}
            gated.gate.set()
            bodies = [f.result().json() for f in futures]
        stats = httpx.get(f"{url}/model").json()["batches"]
    for body, name in zip(bodies, trained["names"][:8]):
        assert body["predictions"][0]["name"] == name
    assert sum(gated.batches) == 8 and max(gated.batches) > 1  # some requests shared a pass
    assert stats["images"] == 8 and stats["batches"] == len(gated.batches)


def test_a_full_queue_answers_503_with_retry_after(trained: dict) -> None:
    from imgcls.serve.app import Batching

    gated = GatedPredictor(load_predictor(trained["run"], device="cpu"))
    upload = [("files", (trained["files"][0].name, trained["files"][0].read_bytes(), "image/png"))]
    app = create_app(gated, batching=Batching(max_batch=1, max_delay_ms=0, max_queue=1))
    with thread_server(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, upload)
        assert gated.entered.wait(HANG_S)  # the worker holds the first request
        second = pool.submit(post, url, upload)
        deadline = time.monotonic() + HANG_S
        while app.state.batcher.queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the second request waits in the (one-place) queue
        refused = post(url, upload)
        gated.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["detail"]


def test_a_request_past_its_timeout_gets_504(trained: dict) -> None:
    from imgcls.serve.app import Batching

    gated = GatedPredictor(load_predictor(trained["run"], device="cpu"))
    upload = [("files", (trained["files"][0].name, trained["files"][0].read_bytes(), "image/png"))]
    app = create_app(gated, batching=Batching(timeout_s=0.2))
    with thread_server(app) as url:
        late = post(url, upload)
        gated.gate.set()
        assert late.status_code == 504 and late.headers["retry-after"] == "1"
        # The server goes on: health answers and the batcher still runs forward passes (asked
        # directly: through HTTP the answer would have to beat the 0.2-s timeout, a race with the CPU).
        assert httpx.get(f"{url}/health", timeout=HANG_S).json() == {"status": "ok"}
        image = np.asarray(Image.open(trained["files"][0]))[None, ..., None]
        assert app.state.batcher.submit(image).result(timeout=HANG_S).shape == (1, trained["probabilities"].shape[1])


def test_uploads_decode_in_a_small_pool_of_their_own_and_health_answers_meanwhile(trained: dict, monkeypatch) -> None:
    import torch

    import imgcls.serve.app as app_module

    gate, threads, lock = threading.Event(), [], threading.Lock()
    decode = app_module.decode_upload

    def gated_decode(*args, **kwargs):
        with lock:
            threads.append(threading.current_thread().name)
        assert gate.wait(HANG_S)
        return decode(*args, **kwargs)

    monkeypatch.setattr(app_module, "decode_upload", gated_decode)
    app = create_app(load_predictor(trained["run"], device="cpu"))
    files = trained["files"][:8]
    with thread_server(app) as url, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, url, [("files", (f.name, f.read_bytes(), "image/png"))]) for f in files]
        deadline = time.monotonic() + HANG_S
        while not threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{url}/health", timeout=HANG_S).json() == {"status": "ok"}  # a decode is blocked
        gate.set()
        bodies = [f.result().json() for f in futures]
    assert [b["predictions"][0]["name"] for b in bodies] == trained["names"][:8]
    # One decode thread per two intra-op threads (at least one), whatever the number of requests.
    assert len(threads) == 8 and all(name.startswith("imgcls-decode") for name in threads)
    assert len(set(threads)) <= max(1, torch.get_num_threads() // 2)


def encoded_multipart(fields: list) -> tuple[bytes, str]:
    """A body and content type as httpx (a real client) encodes them."""
    request = httpx.Request("POST", "http://localhost/predict", files=fields)
    return request.read(), request.headers["content-type"]


def starlette_parts(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """The same body through Starlette's streaming form parser (python-multipart), as a reference."""
    import asyncio

    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def parse():
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}
        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}
        form = await Request(scope, receive).form(max_files=100, max_fields=100)
        return [(key, value.filename, await value.read()) if isinstance(value, UploadFile)
                else (key, None, value.encode()) for key, value in form.multi_items()]
    return asyncio.run(parse())


def test_the_multipart_parser_reads_what_a_real_client_sends() -> None:
    """Random files and names, encoded by httpx, parse as Starlette's streaming parser reads them."""
    from imgcls.serve.uploads import multipart_parts

    rng = np.random.default_rng(0)
    for trial in range(50):
        fields = []
        for i in range(int(rng.integers(1, 6))):
            data = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
            if i == 0:
                data += b"\r\n--" + b"x" * 8 + b"\r\n"  # boundary-like bytes inside a file stay data
            fields.append(("files", (f'p {trial}; "{i}" \u00e9.png', data, "image/png")))
        body, content_type = encoded_multipart(fields)
        parts = multipart_parts(body, content_type, max_parts=32)
        assert parts == starlette_parts(body, content_type)
        assert [data for _, _, data in parts] == [data for _, (_, data, _) in fields]


def test_the_multipart_parser_refuses_malformed_bodies_with_a_4xx() -> None:
    from imgcls.serve.uploads import UploadError, multipart_parts

    body, content_type = encoded_multipart([("files", ("a.png", b"pixels", "image/png"))])
    boundary = content_type.split("boundary=")[1].encode()
    cases = [
        (body[:-10], content_type, 400, "not closed"),  # cut short: no closing boundary
        (body, "multipart/form-data", 400, "boundary"),  # no boundary parameter
        (b"nothing here", content_type, 400, "never appears"),
        (body.replace(b"\r\n\r\n", b"\r\n", 1), content_type, 400, "header block"),
    ]
    for raw, kind, status, words in cases:
        with pytest.raises(UploadError) as caught:
            multipart_parts(raw, kind, max_parts=32)
        assert caught.value.status == status and words in caught.value.message, (words, caught.value.message)
    # A preamble before the first boundary is allowed; a text field has no filename.
    preamble = b"ignored preamble\r\n" + body
    assert multipart_parts(preamble, content_type, 32) == [("files", "a.png", b"pixels")]
    text = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--'
            + boundary + b"--\r\n")
    assert multipart_parts(text, content_type, 32) == [("note", None, b"hello")]
    # More parts than allowed: refused at the first extra part, not after parsing them all.
    many, many_type = encoded_multipart([("files", (f"{i}.png", b"x", "image/png")) for i in range(40)])
    with pytest.raises(UploadError) as caught:
        multipart_parts(many, many_type, max_parts=3)
    assert caught.value.status == 413 and "limit is 3" in caught.value.message
