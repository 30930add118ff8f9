"""``python -m extras.serve`` as a deployment runs it (a process on a free port, images sent as base64 JSON), its
answers compared with ``python -m project predict`` on the same files."""

import base64
import csv
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from extras import export, load_trained, serve
from project.callbacks.prediction_writer import PredictionWriter
from project.cli import cli_main
from project.data.images import read_image
from tests.conftest import QUIET, ROOT, error_line, fails, fit

SIZE = 16  # the folder model's image size


def request(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, bytes]:
    """POST ``body`` (GET without one): the status and the body of the answer, error statuses included."""
    headers = {"Content-Type": content_type} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def image_json(data: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode()}).encode()


def predict(url: str, path: Path) -> dict:
    status, body = request(url + "/predict", image_json(path.read_bytes()))
    assert status == 200, body
    return json.loads(body)


@contextmanager
def served(*args: str, cwd: Path, wait: float = 180) -> Iterator[str]:
    """``python -m extras.serve ARGS --port <free>`` in ``cwd``, its URL once /health says ok; stopped with SIGTERM
    (as a container runtime does), it must exit cleanly, having printed no error."""
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    process = subprocess.Popen(
        [sys.executable, "-m", "extras.serve", *args, "--port", str(port)], env=env, cwd=cwd, **pipes
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        while not up(url):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0 and "Traceback" not in err and "ERROR" not in err, err[-3000:]
    assert out.startswith("serving "), out


def answers_once(args: list[str], cwd: Path) -> None:
    """The README runner's way to run a serve command: start it, classify one PNG file, stop it."""
    png = io.BytesIO()
    Image.new("L", (28, 28)).save(png, "PNG")
    with served(*args, cwd=cwd) as url:
        status, body = request(url + "/predict", image_json(png.getvalue()))
        assert status == 200 and json.loads(body)["top"], body


def up(url: str) -> bool:
    try:
        return request(url + "/health")[0] == 200
    except urllib.error.URLError:  # not listening yet
        return False


@pytest.fixture(scope="module")
def folder_model(image_root, tmp_path_factory) -> Path:
    """The run folder of a tiny classifier of 3 classes of PNG files (the README's own-images path), 2 epochs."""
    root = tmp_path_factory.mktemp("serve-run")
    data = f"--data.init_args.image_size={SIZE} --data.init_args.augment=none"
    rest = "--model.init_args.net.init_args.width=4 --trainer.max_epochs=2 --test_after_fit=false"
    cli = fit("folder.yaml", image_root, *f"{data} {rest}".split(), f"--trainer.default_root_dir={root}")
    return Path(cli.trainer.log_dir)


@pytest.fixture(scope="module")
def files(image_root, tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """A folder of PNG and JPEG files (RGB, grayscale, another size), those files, and two special files elsewhere."""
    folder, other = tmp_path_factory.mktemp("to-serve"), tmp_path_factory.mktemp("special")
    for kind in ("disk", "red", "stripes"):
        for i, path in enumerate(sorted((image_root / kind).glob("*.png"))[:2]):
            shutil.copy(path, folder / f"{kind}{i}.png")
            with Image.open(path) as image:
                image.convert("RGB").save(folder / f"{kind}{i}.jpg", quality=90)
                if i == 0:
                    image.convert("L").resize((31, 29)).save(folder / f"{kind}-gray.png")
    # files a viewer shows differently from their raw pixels: transparency and EXIF orientation
    with Image.open(next((image_root / "disk").glob("*.png"))) as image:
        rgba = image.convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], np.uint8)
    alpha[4:-4, 4:-4] = 255  # a transparent frame: over white it is white, ignoring alpha it would be the image
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(other / "transparent.png")
    with Image.open(next((image_root / "stripes").glob("*.png"))) as image:
        turned = image.convert("RGB").resize((24, 16)).transpose(Image.Transpose.ROTATE_90)  # stored on its side
    exif = Image.Exif()
    exif[0x0112] = 8  # Orientation: rotate 90 degrees clockwise to show it upright
    turned.save(other / "phone.jpg", exif=exif, quality=95)
    return folder, sorted(folder.iterdir()), [other / "transparent.png", other / "phone.jpg"]


@pytest.fixture(scope="module")
def server(folder_model, tmp_path_factory):
    """The folder model served from its checkpoint, with small limits to test them; the folder it runs in."""
    cwd = tmp_path_factory.mktemp("serve-cwd")
    ckpt = folder_model / "checkpoints" / "last.ckpt"
    with served("--ckpt_path", str(ckpt), "--max_pixels", "1000000", "--max_request_mb", "1", cwd=cwd) as url:
        yield url, cwd


def predict_csv(run: Path, images: Path) -> dict[str, dict[str, str]]:
    """The rows of ``python -m project predict -c <run>/config.yaml --ckpt_path last`` on ``images``, by file name."""
    args = [f"--config={run / 'config.yaml'}", "--ckpt_path=last", f"--data.init_args.predict_dir={images}", *QUIET]
    writer = next(c for c in cli_main(["predict", *args]).trainer.callbacks if isinstance(c, PredictionWriter))
    with open(writer.written[0]) as f:
        return {Path(row["id"]).name: row for row in csv.DictReader(f)}


def test_served_answers_are_what_predict_gives_for_the_same_files(server, folder_model, files):
    """PNG and JPEG files, RGB, grayscale, other sizes, transparency, EXIF orientation; the README's curl line too."""
    url, _ = server
    folder, paths, special = files
    rows = predict_csv(folder_model, folder)
    assert len(rows) == len(paths) == 15
    for path in paths:
        answer, row = predict(url, path), rows[path.name]
        assert answer["class"] == row["pred"] and answer["probability"] == pytest.approx(float(row["prob"]), abs=1e-5)
        assert answer["top"][0] == [answer["class"], answer["probability"]] and len(answer["top"]) == 3
        for k, (name, p) in enumerate(answer["top"][:3], start=1):
            assert name == row[f"top{k}_class"] and p == pytest.approx(float(row[f"top{k}_prob"]), abs=1e-5)
    # transparency and EXIF orientation: read as training reads files (project.data.images), whatever the path
    model = load_trained(folder_model / "checkpoints" / "last.ckpt", "test")
    for path in special:
        plain = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        with torch.no_grad():
            expected = model(read_image(path, "RGB", (SIZE, SIZE))[None]).softmax(-1)[0]
            naive = model(torch.from_numpy(plain.copy()).permute(2, 0, 1)[None]).softmax(-1)[0]
        answer = predict(url, path)
        assert answer["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert abs(float(naive.max()) - answer["probability"]) > 1e-4  # the rule made a difference here
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "curl" in x and "/predict" in x)
    command = line.replace("shoe.png", str(paths[0])).replace("http://127.0.0.1:8000", url)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    same(json.loads(done.stdout), predict(url, paths[0]))


def metrics(url: str) -> tuple[dict[str, str], dict[tuple, float]]:
    """``GET /metrics`` parsed by prometheus_client: each family's type, and each sample's value by (name, labels)."""
    status, body = request(url + "/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(body.decode()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return {f.name: f.type for f in families}, samples


def test_32_concurrent_clients_are_all_answered_in_shared_batches(server, files):
    """Batched together, the same answers; Prometheus metrics read back with prometheus_client's own parser."""
    url, paths = server[0], files[1]
    before = metrics(url)[1]
    expected = {p.name: predict(url, p) for p in paths}
    start = threading.Barrier(32)

    def client(i: int) -> tuple[int, bytes]:
        start.wait()
        return request(url + "/predict", image_json(paths[i % len(paths)].read_bytes()))

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(client, range(32)))
    for i, (status, body) in enumerate(answers):
        assert status == 200
        same(json.loads(body), expected[paths[i % len(paths)].name])  # another batch: float rounding only
    (types, after), n = metrics(url), 32 + len(paths)
    grew = {key: value - before.get(key, 0) for key, value in after.items()}
    assert grew["serve_batch_size_sum", ()] == n and grew["serve_batch_size_count", ()] < n  # batches of several
    assert after["serve_requests_total", (("status", "200"),)] >= n
    assert after["serve_request_duration_seconds_count", ()] >= 32
    assert 1 / 3 < after["serve_top1_probability_mean", ()] <= 1
    predictions = {labels: value for (name, labels), value in grew.items() if name == "serve_predictions_total"}
    assert sum(predictions.values()) == n
    assert {dict(labels)["class"] for labels in predictions} <= {"disk", "red", "stripes"}
    families = "serve_batch_size", "serve_requests", "serve_request_duration_seconds", "serve_top1_probability_mean"
    assert [types[f] for f in families] == ["histogram", "counter", "histogram", "gauge"]


def same(answer: dict, expected: dict) -> None:
    assert [name for name, _ in answer["top"]] == [name for name, _ in expected["top"]]
    assert [p for _, p in answer["top"]] == pytest.approx([p for _, p in expected["top"]], abs=1e-5)
    assert answer["top"][0] == [answer["class"], answer["probability"]]


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: kilobytes of file, gigabytes once decoded."""
    compress = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    pixels = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format)
    return out.getvalue()


def test_each_bad_request_gets_its_4xx_and_the_next_good_one_is_answered(server, files, folder_model):
    """One line of detail; the server keeps answering and writes nothing."""
    url, cwd = server
    good = files[1][0]
    expected = predict(url, good)
    bad = {  # what -> (body, its status); all but the first sent as application/json
        "not JSON": (b"image=cat.png", 400),
        "JSON, no image": (b'{"picture": "aGVsbG8="}', 422),
        "not base64": (b'{"image": "not base64!"}', 400),
        "not an image": (image_json(b"just some text, not pixels"), 400),
        "a cut-off JPEG": (image_json(encoded(Image.new("RGB", (400, 300), "red"), "JPEG")[:-200]), 400),
        "over the size limit": (image_json(b"\0" * 1_100_000), 413),
        # 1.2 million pixels, over the server's --max_pixels 1000000
        "over the pixel limit": (image_json(encoded(Image.new("L", (1200, 1000)), "PNG")), 413),
        "a decompression bomb": (image_json(png_bomb(20000, 20000)), 413),
    }
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*")), sorted(folder_model.rglob("*"))
    for what, (body, status) in bad.items():
        content_type = "application/x-www-form-urlencoded" if what == "not JSON" else "application/json"
        got, answer = request(url + "/predict", body, content_type)
        assert got == status, (what, answer)
        detail = json.loads(answer)["detail"]
        assert isinstance(detail, str) and "\n" not in detail and detail, (what, answer)
        same(predict(url, good), expected)
    assert (sorted(p.relative_to(cwd) for p in cwd.rglob("*")), sorted(folder_model.rglob("*"))) == before
    counts = metrics(url)[1]
    for status in (400, 413, 422):
        assert counts["serve_requests_total", (("status", str(status)),)] >= 1


def test_exported_models_give_the_answers_of_their_checkpoint(server, folder_model, files, tmp_path):
    """``--model FILE``: a worker's steps on a .pt2 or .onnx file, in-process on one batch (HTTP: tested above)."""
    url, _ = server
    paths = [*files[1][:4], *files[2]]
    expected = [predict(url, p) for p in paths]
    interrupt = signal.getsignal(signal.SIGINT)  # a worker ignores Ctrl+C (its server stops it): not this process
    ckpt = str(folder_model / "checkpoints" / "last.ckpt")
    try:
        for format in ("pt2", "onnx"):
            path = str(export.export(ckpt, format, str(tmp_path / f"m.{format}")))
            feeding, _ = serve.feeding_of(None, path)
            limits = {"max_pixels": 10**6, "window": 100, "threads": 1}
            api = serve.ImageClassifierAPI(format, path, feeding, limits, max_batch_size=8)
            api.setup("cpu")
            bodies = [serve.PredictRequest.model_validate_json(image_json(p.read_bytes())) for p in paths]
            outputs = api.unbatch(api.predict(api.batch([api.decode_request(body) for body in bodies])))
            for output, reference in zip(outputs, expected, strict=True):
                same(api.encode_response(output), reference)
    finally:
        signal.signal(signal.SIGINT, interrupt)


def test_a_command_that_cannot_serve_says_why_in_one_line(folder_model, capsys):
    ckpt = str(folder_model / "checkpoints" / "last.ckpt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        for args, says in (
            ([], "give one of --ckpt_path CKPT or --model FILE"),
            (["--ckpt_path", ckpt, "--model", "model.pt2"], "give one of --ckpt_path CKPT or --model FILE"),
            (["--model", "notes.txt"], "is not an exported model; pass a .onnx or .pt2 file"),
            (["--ckpt_path", ckpt, "--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ):
            assert says in fails(args, capsys, main=serve.main)


def test_without_the_serve_extra_the_command_says_what_to_install(tmp_path):
    """`pip install -e .` alone has no LitServe: one line naming the extra."""
    code = (
        "import runpy, sys; sys.modules['litserve'] = None; sys.argv = ['serve', '--ckpt_path', 'last.ckpt']; "
        "runpy.run_module('extras.serve', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and error_line(done.stderr).endswith('pip install -e ".[serve]" installs it')
    assert list(tmp_path.iterdir()) == []
