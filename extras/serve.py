"""Serve a classifier over HTTP with LitServe: dynamic batching, a health check and Prometheus metrics.

    python -m extras.serve --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt
    python -m extras.serve --model last.pt2      # or last.onnx: an exported model, without this project's training code

``POST /predict`` takes JSON ``{"image": "<base64 of an image file>"}`` (PNG, JPEG, GIF, BMP, TIFF, WebP) and
answers ``{"class": ..., "probability": ..., "top": [[class, probability], ...]}``. The file is read by
``project.data.images.read_image``, the function training and ``python -m project predict`` read image files with,
with the image mode, size and background the model was trained with (from the checkpoint and its run's config, or
from the exported file's metadata), so the answer is the one ``predict`` gives for that file.

Requests that arrive together share one forward pass (LitServe's dynamic batching, up to ``--max_batch_size``).
``GET /health`` answers ``ok`` once the model is loaded; ``GET /metrics`` has Prometheus metrics: requests by HTTP
status, their latency, batch sizes, predictions per class and the mean top-1 probability of the last ``--window``
predictions (a falling confidence is the first sign of drift). A bad request gets a 4xx status and a one-line JSON
error ``{"detail": "..."}``; the server keeps answering and writes nothing to disk (its metrics live in a temporary
folder in memory, ``/dev/shm``, removed when it stops).
"""

import base64
import binascii
import importlib.util
import logging
import os
import signal
import socket
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from extras import command_line
from project.errors import UserError, exit_on_user_error, require

with exit_on_user_error():  # without the [serve] extra: one line naming it
    import litserve as ls
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # PIL formats a request may hold; no EPS (ghostscript) & co
TOP_K = 5


class PredictRequest(BaseModel):
    image: str  # base64 of an image file, or a data URL (data:image/png;base64,...)


@dataclass
class Rejected:
    """A request that cannot be answered: its HTTP status and a one-line reason."""

    status: int
    detail: str


class ImageClassifierAPI(ls.LitAPI):
    """Image file bytes -> read_image -> the model -> class probabilities; each worker process loads the model."""

    def __init__(self, kind: str, path: str, feeding: dict[str, Any], limits: dict[str, int], **batching: Any) -> None:
        with warnings.catch_warnings():  # --max_batch_size 1: batch and unbatch are simply not used
            warnings.filterwarnings("ignore", message="The LitServer has both batch and unbatch")
            super().__init__(**batching)
        self.kind, self.path, self.feeding, self.limits = kind, path, feeding, limits

    def setup(self, device: str) -> None:
        import torch

        from project.data.images import read_image

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches every process: the server stops the workers
        self.read_image, self.torch, path = read_image, torch, self.path
        if device == "cpu":  # half the cores: the API processes need the rest (busy torch threads starve them)
            torch.set_num_threads(self.limits["threads"])
        self.monitor = WorkerMetrics(self.max_batch_size, self.limits["window"])
        if self.kind == "ckpt":
            from extras import load_trained

            model = load_trained(path, "serve").to(device)
            self.forward = lambda images: model(images.to(device)).float().softmax(-1).cpu()
        elif self.kind == "pt2":
            from torch.export.passes import move_to_device_pass

            program = torch.export.load(path)
            program = move_to_device_pass(program, device) if device != "cpu" else program
            module = program.module()
            self.forward = lambda images: module(images.to(device)).float().cpu()
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.forward = lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

    def decode_request(self, request: PredictRequest) -> Any:
        """uint8 (C, H, W) pixels, or why not: a bad request must not fail the others of its batch."""
        from PIL import Image, UnidentifiedImageError

        text = request.image.partition(",")[2] if request.image.startswith("data:") else request.image
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return Rejected(400, 'the "image" value is not base64; send the base64 of an image file')
        _, h, w = self.feeding["input_shape"]
        try:
            with Image.open(BytesIO(data), formats=FORMATS) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError as err:
            return Rejected(413, f"the image is too large to decode ({err})"[:300])
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return Rejected(400, f"the data is not an image file ({', '.join(FORMATS)})")
        if width * height > self.limits["max_pixels"]:
            limit = self.limits["max_pixels"]
            return Rejected(413, f"the image has {width}x{height} pixels, more than --max_pixels {limit}")
        try:
            return self.read_image(BytesIO(data), self.feeding["image_mode"], (h, w), self.feeding["background"])
        except Exception as err:  # noqa: BLE001 - PIL raises many types on a damaged file (e.g. a cut-off JPEG)
            return Rejected(400, f"the image cannot be decoded ({type(err).__name__}: {err})"[:300])

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs  # pixels and rejections: predict stacks the pixels

    def predict(self, x: Any) -> Any:
        items = x if self.max_batch_size > 1 else [x]
        images = [item for item in items if not isinstance(item, Rejected)]
        if images:
            with self.torch.inference_mode():
                batch = self.forward(self.torch.stack(images))
            top_p, top_i = batch.max(dim=-1)
            self.monitor.observe([self.feeding["class_names"][i] for i in top_i.tolist()], top_p.tolist())
            probabilities = iter(batch)
        outputs = [item if isinstance(item, Rejected) else next(probabilities) for item in items]
        return outputs if self.max_batch_size > 1 else outputs[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        names = self.feeding["class_names"]
        top_p, top_i = output.topk(min(TOP_K, len(names)))
        top = [[names[i], round(p, 6)] for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True)]
        return {"class": top[0][0], "probability": top[0][1], "top": top}


class WorkerMetrics:
    """Prometheus metrics of one model worker: batch sizes, predictions per class, and the mean top-1 probability of
    its last ``window`` predictions (with several workers: the worker that answered last)."""

    def __init__(self, max_batch_size: int, window: int) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        sizes = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch_size = Histogram("serve_batch_size", "images per forward pass", buckets=sizes, registry=None)
        self.predictions = Counter("serve_predictions", "predictions per class", ["class"], registry=None)
        self.confidence = Gauge(
            "serve_top1_probability_mean",
            f"mean top-1 probability of the last {window} predictions",
            multiprocess_mode="mostrecent",
            registry=None,
        )
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, classes: list[str], probabilities: list[float]) -> None:
        self.batch_size.observe(len(classes))
        for name in classes:
            self.predictions.labels(name).inc()
        self.recent.extend(probabilities)
        self.confidence.set(sum(self.recent) / len(self.recent))


class RequestMetrics:
    """ASGI middleware: ``/predict`` requests counted by HTTP status, and their latency (in each API process)."""

    def __init__(self, app: Any, path: str = "/predict") -> None:
        from prometheus_client import Counter, Histogram

        self.app, self.path = app, path
        self.requests = Counter("serve_requests", "/predict requests by HTTP status", ["status"], registry=None)
        self.latency = Histogram("serve_request_duration_seconds", "/predict latency, seconds", registry=None)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.requests.labels(str(status)).inc()
            self.latency.observe(time.perf_counter() - start)


def metrics(request: Request) -> Response:
    """Every process's metrics (prometheus_client's multiprocess mode), in Prometheus' text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's validation error as one line: the body is not JSON, or has no "image" string."""
    first = error.errors()[0] if error.errors() else {}
    status = 400 if first.get("type") in ("json_invalid", "model_attributes_type") else 422
    return JSONResponse(
        {
            "detail": f'send JSON {{"image": "<base64 of an image file>"}} (Content-Type: application/json); '
            f"{first.get('msg', 'invalid body')}"
        },
        status_code=status,
    )


def feeding_of(ckpt_path: str | None, model: str | None) -> tuple[dict[str, Any], str]:
    """How to read images for the model (the export metadata), and a description; one error line for a bad file."""
    if ckpt_path:
        from extras import load_trained
        from extras.export import metadata, trained_background

        classifier = load_trained(ckpt_path, "serve")
        return metadata(classifier, trained_background(ckpt_path, classifier)), f"checkpoint {ckpt_path}"
    from extras.export import read_metadata, run_onnx, run_pt2

    feeding = read_metadata(model)
    require(
        isinstance(feeding.get("class_names"), list) and len(feeding.get("input_shape") or ()) == 3,
        f"{model} has no feeding metadata (class_names, input_shape); export it with `python -m extras.export`",
    )
    import numpy as np

    c, h, w = feeding["input_shape"]
    (run_onnx if model.endswith(".onnx") else run_pt2)(model, np.zeros((1, c, h, w), np.uint8))  # it runs
    return feeding, f"exported model {model}"


def stop_on(*signals: int) -> None:
    """Each of ``signals`` stops the server: LitServe stops its processes (its shutdown is not an error to log),
    then the metrics folder is removed. The API processes LitServe forks inherit the handler: there it only ends
    the process."""
    main = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != main:
            raise SystemExit(0)
        logging.getLogger("litserve").setLevel(logging.CRITICAL)  # "worker died": the ones it is stopping
        raise KeyboardInterrupt

    for signum in signals:
        signal.signal(signum, stop)


def serve(
    ckpt_path: str | None = None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    max_batch_size: int = 32,
    batch_timeout: float = 0.002,
    max_request_mb: float = 20.0,
    max_pixels: int = 50_000_000,
    window: int = 1000,
) -> None:
    """Serve a classifier: ``POST /predict``, ``GET /health``, ``GET /metrics``.

    Args:
        ckpt_path: a checkpoint written by ``python -m project fit`` (or give ``model``).
        model: an exported model, ``.pt2`` or ``.onnx`` (``python -m extras.export``).
        host: the address to listen on; ``0.0.0.0``: every interface (e.g. in a container).
        port: the port to listen on.
        workers: model processes (each loads the model; on CPU they share the cores).
        max_batch_size: most requests one forward pass answers together (1: no batching).
        batch_timeout: seconds a worker waits for more requests to fill a batch.
        max_request_mb: largest request body, in MB (larger: status 413).
        max_pixels: largest image, in pixels (larger: status 413, before it is decoded).
        window: the mean top-1 probability in ``/metrics`` is over this many latest predictions.
    """
    require((ckpt_path is None) != (model is None), "give one of --ckpt_path CKPT or --model FILE (.pt2 or .onnx)")
    require(  # imported by each process once its metrics folder is set
        importlib.util.find_spec("prometheus_client"),
        "No module named 'prometheus_client': pip install -e \".[serve]\" installs it",
    )
    require(workers >= 1 and max_batch_size >= 1, "--workers and --max_batch_size must be at least 1")
    require(batch_timeout >= 0 and max_request_mb > 0 and max_pixels > 0 and window >= 1, "limits must be positive")
    require(host in ("127.0.0.1", "0.0.0.0", "::"), f"--host must be 127.0.0.1, 0.0.0.0 or ::, got {host}")
    feeding, described = feeding_of(ckpt_path, model)
    require(
        feeding["image_mode"] in ("L", "RGB"),
        f"the model takes {feeding['input_shape'][0]}-channel images; only L (1) or RGB (3) images can be served",
    )
    with socket.socket(socket.AF_INET6 if host == "::" else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from err
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="serve-metrics-", dir=shm) as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # before prometheus_client is imported, in every process
        api = ImageClassifierAPI(
            "ckpt" if ckpt_path else Path(model).suffix[1:],
            str(Path(ckpt_path or model).resolve()),
            feeding,
            {"max_pixels": max_pixels, "window": window, "threads": max(1, (os.cpu_count() or 1) // (2 * workers))},
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
        )
        server = ls.LitServer(
            api,
            workers_per_device=workers,
            max_payload_size=int(max_request_mb * 1e6),
            middlewares=[(RequestMetrics, {})],
            model_metadata={k: feeding[k] for k in ("class_names", "input_shape", "image_mode", "background")},
        )
        server.app.add_api_route("/metrics", metrics, methods=["GET"])
        server.app.add_exception_handler(RequestValidationError, bad_body)
        stop_on(signal.SIGTERM, signal.SIGINT)
        print(
            f"serving {described} ({len(feeding['class_names'])} classes, {feeding['image_mode']} "
            f"{feeding['input_shape'][1]}x{feeding['input_shape'][2]}) on http://{host}:{port}: POST /predict, "
            f"GET /health, GET /metrics; {workers} worker(s), batches of up to {max_batch_size}",
            flush=True,
        )
        try:
            server.run(host=host, port=port, log_level="warning", generate_client_file=False, access_log=False)
        except KeyboardInterrupt:  # stopped while the workers were starting
            pass


def main(args: Sequence[str] | None = None) -> None:
    command_line(serve, args)


if __name__ == "__main__":
    main()
