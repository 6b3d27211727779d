"""FastAPI app: POST /predict (multipart, top-k), GET /health, GET /model, GET / (upload page)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from imgcls.errors import OptionError
from imgcls import engines
from imgcls.predict import check_tta, load_predictor
from imgcls.runtime import pick_device, usable_cores
from imgcls.serve.batching import Batching, DynamicBatcher, QueueFull
from imgcls.serve.uploads import UploadError, UploadLimits, decode_upload, multipart_parts

FIELD = "files"
MAX_K = 1000  # classes per image a request may ask for
WORKER_SETTINGS = "IMGCLS_SERVE_WORKER"  # environment variable: what each --workers process builds its app from


class Phases:
    """Where a request's time goes in the handler: parse (multipart), decode, respond (top-k and
    JSON); queue and forward come from the batcher's stats. Updated on the event loop only."""

    NAMES = ("parse", "decode", "respond")

    def __init__(self) -> None:
        self.requests = 0
        self.seconds = dict.fromkeys(self.NAMES, 0.0)

    def add(self, **seconds: float) -> None:
        self.requests += 1
        for name, value in seconds.items():
            self.seconds[name] += value

    def to_json(self, batches: dict) -> dict:
        """Mean milliseconds per answered request, in the order a request meets them."""
        def mean_ms(name: str) -> float:
            return round(1000 * self.seconds[name] / self.requests, 3) if self.requests else 0.0
        return {"requests": self.requests, "parse": mean_ms("parse"), "decode": mean_ms("decode"),
                "queue": batches["queue_ms_per_request"], "forward": batches["forward_ms_per_request"],
                "respond": mean_ms("respond")}


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit before they are buffered or spooled to disk."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": f"request body of {int(length):,} bytes exceeds the "
                                               f"{self.max_bytes:,}-byte limit"}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # chunked uploads carry no Content-Length
                raise HTTPException(413, f"request body exceeds the {self.max_bytes:,}-byte limit")
            return message

        await self.app(scope, limited, send)


def describe_model(predictor) -> dict:
    """What a client needs to know, from the model's one description: classes, input layout, origin."""
    description = predictor.description
    info = description["model"]
    classes = predictor.classes
    return {
        "model": info["name"], "engine": predictor.engine, "tta": predictor.tta,
        "source_run": description["source_run"], "config_hash": description["config_hash"],
        "best_val_acc": description["best_val_acc"],
        "input": {"channels": info["data_channels"], "size": list(info["data_size"]),
                  "model_input_size": info["image_size"] or list(info["data_size"])},
        "classes": [{"label": label, "name": name} for label, name in
                    zip(classes.decode(range(classes.num_classes)), classes.names)],
    }


def top_k(probabilities: np.ndarray, predictor, k: int) -> list[dict]:
    """The k most probable classes, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    labels = predictor.classes.decode(order)
    return [{"label": label, "name": predictor.classes.names[i], "probability": round(float(probabilities[i]), 6)}
            for label, i in zip(labels, order)]


async def read_uploads(request: Request, limits: UploadLimits) -> list[tuple[str, bytes]]:
    """(filename, bytes) for each file in the `files` field; 4xx for anything else."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(415, f"send the images as multipart/form-data in field {FIELD!r} "
                               f"(got content type {content_type or 'none'!r})")
    parts = multipart_parts(await request.body(), content_type, limits.max_files)
    others = sorted({str(name) for name, _, _ in parts if name != FIELD})
    files = [(filename, data) for name, filename, data in parts if name == FIELD]
    if not files:
        hint = f" (got field {', '.join(map(repr, others))})" if others else ""
        raise UploadError(400, f"no images: send them in multipart field {FIELD!r}{hint}")
    if others:
        raise UploadError(400, f"unexpected form field {', '.join(map(repr, others))}; only {FIELD!r} is read")
    uploads = []
    for i, (filename, data) in enumerate(files):
        if filename is None:
            raise UploadError(400, f"field {FIELD!r} item {i + 1} is text, not a file upload")
        uploads.append((filename or f"file {i + 1}", data))
    return uploads


def top_k_parameter(request: Request) -> int:
    """The `k` query parameter (default 3), or a 422 naming it."""
    text = request.query_params.get("k", "3")
    if not (text.isdigit() and 1 <= int(text) <= MAX_K):
        raise UploadError(422, f"query.k: must be a whole number from 1 to {MAX_K} (got {text!r})")
    return int(text)


class Overloaded(UploadError):
    """The request could not be served in time: 503 (queue full) or 504 (timed out), with Retry-After."""


class PendingAnswer:
    """One request's way from a decode thread through the batcher back to the event loop.

    The decode thread decodes, queues the images itself and hands the batcher's answer (or the
    error) to the event loop with one call_soon_threadsafe: one wake-up of the loop a request
    instead of one per hop (decode, then forward), which under load is a measurable share of the
    loop's time (README, "Serving"). `deadline` answers 504 if nothing came by then."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float):
        self.loop = loop
        self.result: asyncio.Future = loop.create_future()
        self.forward = None  # the batcher's future once queued
        self.decoded_at = 0.0
        self.deadline = loop.call_later(timeout_s, self.expire, timeout_s)
        self.result.add_done_callback(lambda _: self.deadline.cancel())  # also when the client went away

    def expire(self, timeout_s: float) -> None:
        self.settle(exception=Overloaded(504, f"no answer within {timeout_s:g}s (server overloaded)"))
        if self.forward is not None:
            self.forward.cancel()

    def settle(self, result=None, exception: BaseException | None = None) -> None:
        """On the event loop: the first outcome wins (an answer after the deadline is dropped)."""
        if self.result.done():
            return
        if exception is not None:
            self.result.set_exception(exception)
        else:
            self.result.set_result(result)

    def from_thread(self, result=None, exception: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(self.settle, result, exception)

    def forward_done(self, forward) -> None:
        """The batcher's callback, in its thread."""
        if not forward.cancelled():
            error = forward.exception()
            self.from_thread(None if error else forward.result(), error)


def create_app(predictor, limits: UploadLimits | None = None, batching: Batching | None = None) -> FastAPI:
    """The app over one loaded predictor: uploads decode in worker threads, and concurrent requests
    share forward passes through one dynamic batcher, so the event loop (and /health) never waits on
    the model."""
    limits, batching = limits or UploadLimits(), batching or Batching()
    channels, size = predictor.data_layout
    info = {**describe_model(predictor), "batching": asdict(batching), "threads": torch.get_num_threads()}
    phases = Phases()
    page = resources.files("imgcls.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    batcher = DynamicBatcher(lambda images: predictor.predict_proba(torch.from_numpy(images)),
                             max_batch=batching.max_batch, max_delay_s=batching.max_delay_ms / 1000,
                             max_queue=batching.max_queue)
    # Half the process's cores decode (the forward pass has the rest), not one thread per waiting
    # request: decoding holds the GIL part of the time, and dozens of threads taking turns with the
    # event loop and the batcher slow all three (README, "Serving").
    decoders = ThreadPoolExecutor(max(1, torch.get_num_threads() // 2), thread_name_prefix="imgcls-decode")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await anyio.to_thread.run_sync(batcher.close)
        decoders.shutdown(wait=False)

    app = FastAPI(title="imgcls", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.state.batcher = batcher

    def decode_and_queue(uploads: list[tuple[str, bytes]], pending: PendingAnswer) -> None:
        """In a decode thread: decode, then queue for the batcher, which answers `pending`."""
        if pending.result.done():  # its deadline passed while it waited for this thread
            return
        try:
            images = np.stack([decode_upload(data, name, channels, size, limits, predictor.resize_policy)
                               for name, data in uploads])
            pending.decoded_at = time.perf_counter()
            pending.forward = batcher.submit(images)
            if pending.result.done():  # expired while it was queued: the batcher may skip it
                pending.forward.cancel()
        except QueueFull as exc:
            pending.from_thread(exception=Overloaded(503, f"server busy ({exc}); retry shortly"))
            return
        except Exception as exc:  # noqa: BLE001 - an UploadError (or worse) for the handler to answer
            pending.from_thread(exception=exc)
            return
        pending.forward.add_done_callback(pending.forward_done)

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client; the server log has it.
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        batches = batcher.stats.to_json()
        return {**info, "limits": limits.to_json(), "batches": batches,
                "time_per_request_ms": phases.to_json(batches), "process": os.getpid()}

    async def predict(request: Request) -> JSONResponse:
        """POST /predict?k=3: a plain Starlette route; FastAPI's per-request parameter machinery
        cost a tenth of the event loop's time under load for one integer (README, "Serving")."""
        k = min(top_k_parameter(request), predictor.classes.num_classes)
        t0 = time.perf_counter()
        uploads = await read_uploads(request, limits)
        t1 = time.perf_counter()
        pending = PendingAnswer(asyncio.get_running_loop(), batching.timeout_s)
        decoders.submit(decode_and_queue, uploads, pending)
        rows = await pending.result
        t3 = time.perf_counter()
        results = []
        for (name, _), row in zip(uploads, rows):
            top = top_k(row, predictor, k)
            results.append({"filename": name, **top[0], "top": top})
        response = JSONResponse({"predictions": results, "model": info["model"], "engine": info["engine"],
                                 "seconds": round(t3 - t1, 4)})
        phases.add(parse=t1 - t0, decode=pending.decoded_at - t1, respond=time.perf_counter() - t3)
        return response

    app.add_route("/predict", predict, methods=["POST"])
    return app


# `--workers auto` on a CPU: one process per core, at most this many (each holds its own model).
MAX_AUTO_WORKERS = 4


def auto_workers(device: torch.device) -> int:
    """Server processes for `--workers auto`: on a GPU one (its batches fill the GPU; more would
    each hold a copy of the model in GPU memory); on a CPU one a core, up to MAX_AUTO_WORKERS, each
    with one core's intra-op threads. Python's HTTP parsing and decoding run one request at a time
    per process, and a small batch gains little from a second intra-op thread: on 2 cores two
    one-thread workers served more requests under load than one two-thread worker (README, "Serving")."""
    return 1 if device.type == "cuda" else max(1, min(usable_cores(), MAX_AUTO_WORKERS))


def serve(run: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, engine: str = "auto",
          device: str = "auto", limits: UploadLimits | None = None, tta: str = "none",
          batching: Batching | None = None, workers: int | str = "auto") -> None:
    """Load the run, then serve until interrupted; `workers` > 1: that many processes on one socket
    ("auto": auto_workers).

    Each worker is a uvicorn worker process with its own model, batcher and 1/N of the cores as
    intra-op threads: the kernel spreads connections over them, so HTTP parsing, decoding and forward
    passes run in parallel with no extra hop (a process pool behind one server would pickle every
    image across processes). `--engine auto` measures once, here, before the workers start.
    """
    import uvicorn  # the server itself: only `imgcls serve` needs it

    workers = auto_workers(pick_device(device)) if workers == "auto" else workers
    if workers < 1:
        raise OptionError(f"--workers must be 1 or more, not {workers}")
    limits, batching = limits or UploadLimits(), batching or Batching()
    threads = max(1, usable_cores() // workers)
    if workers == 1:
        predictor = load_predictor(run, engine, device, tta, threads=threads, log=print,
                                   serving_batch=batching.max_batch)
        print(f"serving {predictor.model_info['name']} ({predictor.engine}, {threads} thread(s)) from {run} "
              f"on http://{host}:{port}/", flush=True)
        uvicorn.run(create_app(predictor, limits, batching), host=host, port=port, log_level="warning",
                    access_log=False)
        return
    if engine == "auto":  # measured (or read from engine.json) once, so the workers need not
        engine = load_predictor(run, engine, device, tta, threads=threads, log=print,
                                serving_batch=batching.max_batch).engine
    else:
        check_tta(tta)
        engines.check_engine(engine)
    os.environ[WORKER_SETTINGS] = json.dumps({
        "run": str(run), "engine": engine, "device": device, "tta": tta, "threads": threads,
        "limits": asdict(limits), "batching": asdict(batching)})
    print(f"serving {run} ({engine}, {workers} workers x {threads} thread(s)) on http://{host}:{port}/", flush=True)
    uvicorn.run("imgcls.serve.app:worker_app", factory=True, workers=workers, host=host, port=port,
                log_level="warning", access_log=False)


def worker_app() -> FastAPI:
    """The app of one `--workers` process, from the settings serve() left in the environment."""
    settings = json.loads(os.environ[WORKER_SETTINGS])
    predictor = load_predictor(settings["run"], settings["engine"], settings["device"], settings["tta"],
                               threads=settings["threads"])
    limits = UploadLimits(**{**settings["limits"], "formats": tuple(settings["limits"]["formats"])})
    return create_app(predictor, limits, Batching(**settings["batching"]))
