"""Serving on CPU: the main job's model behind ``python -m extras.serve`` (LitServe, dynamic batching) and behind a
plain server (FastAPI + uvicorn, one forward pass per request), side by side: images/s and p50/p99 latency with 1, 8
and 32 concurrent clients, each sending real Fashion-MNIST test images (PNG files, base64 in JSON) one after another.

    python bench/serve.py [--ckpt CKPT]      # about 7 min on 2 idle CPU cores (13 min at load average 10)

The plain server loads the same checkpoint the same way (``extras.load_trained``), reads each file with the same
function (``project.data.images.read_image``) and answers the same JSON; it runs one uvicorn process per core, each
with one torch thread and FastAPI's thread pool, so it uses every core too. ``extras.serve`` runs with its defaults.
Each run starts both servers afresh (A B A B ...); a client load runs 1 s unmeasured, then ``--seconds``.
"""

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    DATA,
    PYTHON,
    ROOT,
    child_env,
    fmt,
    footer,
    interleave,
    judged,
    parser,
    prepare_fashion_mnist,
    provenance,
    save,
    spread,
    timed,
    verdict,
)

NAME, TITLE = "serve", "Serving"
SERVE = "python -m extras.serve --ckpt_path {ckpt}"
CLIENTS = (1, 8, 32)
GOAL_SPEEDUP, GOAL_P99 = 3.0, 0.100  # >= 3x the plain server's images/s at 32 clients; p99 <= 100 ms at 8 clients
SIDES = ("litserve", "plain")
MIXED = "some runs are below the goal, some above"


def read_request(text: str, image_shape: list[int]) -> Any:
    """The pixels of a request's base64 image file, read as the model was trained (both servers' shared work)."""
    from project.data.images import read_image

    c, h, w = image_shape
    return read_image(io.BytesIO(base64.b64decode(text)), "L" if c == 1 else "RGB", (h, w))


def plain_app() -> Any:
    """The baseline (uvicorn's app factory; the checkpoint from ``$BENCH_CKPT``): one forward pass per request."""
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel

    from extras import load_trained

    torch.set_num_threads(1)
    model = load_trained(os.environ["BENCH_CKPT"], "bench")
    names = model.class_names
    app = FastAPI()

    class Image(BaseModel):
        image: str

    @app.post("/predict")
    def predict(request: Image) -> dict[str, Any]:
        pixels = read_request(request.image, model.hparams["image_shape"])
        with torch.inference_mode():
            top_p, top_i = model(pixels[None]).float().softmax(-1)[0].topk(min(5, len(names)))
        top = [[names[i], round(p, 6)] for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True)]
        return {"class": top[0][0], "probability": top[0][1], "top": top}

    @app.get("/health")
    def health() -> str:
        return "ok"

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(side: str, ckpt: Path, folder: Path) -> tuple[subprocess.Popen, str]:
    """One server in a process group of its own, once /health answers; its URL."""
    port = free_port()
    if side == "litserve":
        cmd = [PYTHON, "-m", "extras.serve", "--ckpt_path", str(ckpt), "--port", str(port)]
        env = child_env()
    else:
        options = f"factory=True, port={port}, workers={os.cpu_count()}, log_level='warning', access_log=False"
        cmd = [PYTHON, "-c", f"import uvicorn; uvicorn.run('serve:plain_app', {options})"]  # bench/serve.py
        env = child_env(BENCH_CKPT=str(ckpt), PYTHONPATH=f"{ROOT / 'bench'}{os.pathsep}{ROOT}")
    process = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not asyncio.run(healthy(url)):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{side} server did not start: {' '.join(cmd)}")
        time.sleep(0.5)
    return process, url


async def healthy(url: str) -> bool:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as answer:
            return answer.status == 200
    except aiohttp.ClientError:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as a container runtime stops a server, then wait for the whole group."""
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


async def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` clients, each sending one request after the other for ``seconds``: images/s and latencies."""
    import aiohttp

    latencies, failures = [], 0
    connector = aiohttp.TCPConnector(limit=clients)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.perf_counter() + seconds

        async def client(k: int) -> None:
            nonlocal failures
            i = k
            while time.perf_counter() < end:
                sent = time.perf_counter()
                async with session.post(url + "/predict", data=bodies[i % len(bodies)], headers=headers) as answer:
                    await answer.read()
                    failures += answer.status != 200
                latencies.append(time.perf_counter() - sent)
                i += clients

        began = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "requests": len(latencies),
        "failures": failures,
    }


def measure(side: str, ckpt: Path, bodies: list[bytes], seconds: float, folder: Path) -> dict[str, Any]:
    process, url = start(side, ckpt, folder)
    try:
        figures = {}
        for clients in CLIENTS:
            asyncio.run(load(url, bodies, clients, 1.0))  # warm-up: connections, first batches
            figures[str(clients)] = asyncio.run(load(url, bodies, clients, seconds))
            print(f"  {side}, {clients} clients: {figures[str(clients)]}", file=sys.stderr, flush=True)
    finally:
        stop(process)
    return figures


def same_answers(ckpt: Path, bodies: list[bytes], folder: Path) -> float:
    """The largest probability difference between the two servers' answers on the first 32 images."""

    async def answers(url: str) -> list[dict]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            found = []
            for body in bodies[:32]:
                async with session.post(url + "/predict", data=body, headers={"Content-Type": "application/json"}) as a:
                    found.append(json.loads(await a.read()))
            return found

    got = {}
    for side in SIDES:
        process, url = start(side, ckpt, folder)
        try:
            got[side] = asyncio.run(answers(url))
        finally:
            stop(process)
    pairs = list(zip(got["litserve"], got["plain"], strict=True))
    if any([n for n, _ in a["top"]] != [n for n, _ in b["top"]] for a, b in pairs):
        raise RuntimeError("the two servers classify the same files differently")
    return max(abs(p - q) for a, b in pairs for (_, p), (_, q) in zip(a["top"], b["top"], strict=True))


def test_images(n: int) -> list[bytes]:
    """The first ``n`` Fashion-MNIST test images as PNG files, each as a request body."""
    from PIL import Image
    from torchvision import datasets

    images = datasets.FashionMNIST(str(DATA), train=False).data[:n].numpy()
    bodies = []
    for pixels in images:
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, "PNG")
        bodies.append(json.dumps({"image": base64.b64encode(png.getvalue()).decode()}).encode())
    return bodies


def ceiling(ckpt: Path, bodies: list[bytes], repeats: int = 200) -> dict[str, float]:
    """What batching can save at most, in this process on one thread (each server's model runs on one): seconds per
    image of the work both servers do per request (base64 and PNG decoding) and of the forward pass at batch 1 and at
    batch 32. HTTP, JSON and the hop between processes come on top of both and are left out, so the ratio
    ``(decode + forward_1) / (decode + forward_32 / 32)`` bounds any batching server's gain over the plain one."""
    import torch

    from extras import load_trained

    torch.set_num_threads(1)
    model = load_trained(str(ckpt), "bench")
    texts = [json.loads(body)["image"] for body in bodies]

    def decode(text: str) -> torch.Tensor:
        return read_request(text, model.hparams["image_shape"])

    def per_image(work: Any, images: int) -> float:
        work()  # warm-up
        began = time.perf_counter()
        for _ in range(repeats):
            work()
        return (time.perf_counter() - began) / repeats / images

    one, batch = decode(texts[0])[None], torch.stack([decode(t) for t in texts[:32]])
    with torch.inference_mode():
        figures = {
            "decode": per_image(lambda: [decode(t) for t in texts[:32]], 32),
            "forward_1": per_image(lambda: model(one).float().softmax(-1), 1),
            "forward_32": per_image(lambda: model(batch).float().softmax(-1), 32),
        }
    figures["bound"] = (figures["decode"] + figures["forward_1"]) / (figures["decode"] + figures["forward_32"])
    print(f"  ceiling: {figures}", file=sys.stderr, flush=True)
    return figures


def train(folder: Path) -> Path:
    """The main job's model, trained briefly: serving speed depends on the net, not on how well it learned."""
    extra = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=50", "--test_after_fit=false"]
    timed(
        [PYTHON, "-m", "project", "fit", "-c", "configs/fashion_mnist.yaml", "-c", "configs/logger/csv.yaml", *extra],
        cwd=folder,
    )
    return next(folder.glob("runs/fashion_mnist/version_*/checkpoints/last.ckpt"))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt", type=Path, help="a main-job checkpoint to serve instead of training one briefly")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per client count")
    p.add_argument("--runs", type=int, default=3, help="runs per side, alternating")
    args = p.parse_args()
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))  # the servers' working folder, and the training's
    (folder / "configs").symlink_to(ROOT / "configs")
    (folder / "data").symlink_to(DATA)
    try:
        ckpt = args.ckpt.resolve() if args.ckpt else train(folder)
        bodies = test_images(256)
        difference = same_answers(ckpt, bodies, folder)
        sides = (lambda s=s: measure(s, ckpt, bodies, args.seconds, folder) for s in SIDES)
        runs = interleave(args.runs, *sides, names=SIDES)
        bound = ceiling(ckpt, bodies)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    data = {"same_answers_max_difference": difference, "runs": dict(zip(SIDES, runs, strict=True)), "ceiling": bound}
    data["figures"] = {
        side: {
            str(c): {
                key: spread([run[str(c)][key] for run in data["runs"][side]]) for key in ("images_per_s", "p50", "p99")
            }
            for c in CLIENTS
        }
        for side in SIDES
    }
    data["failures"] = sum(run[str(c)]["failures"] for side in SIDES for run in data["runs"][side] for c in CLIENTS)
    print(render(save(NAME, p, args, prov, data, started)))


def judge(r: dict) -> tuple[str, str]:
    f = r["figures"]
    speedup = verdict(
        f["litserve"]["32"]["images_per_s"]["runs"],
        f["plain"]["32"]["images_per_s"]["runs"],
        GOAL_SPEEDUP,
        at_most=False,
    )
    p99 = verdict(f["litserve"]["8"]["p99"]["runs"], [1], GOAL_P99, at_most=True)
    return speedup, p99


def summary(r: dict) -> tuple[str, str, str]:
    f = r["figures"]
    speedup = f["litserve"]["32"]["images_per_s"]["median"] / f["plain"]["32"]["images_per_s"]["median"]
    a, b = judge(r)
    return (
        f">= {GOAL_SPEEDUP:g}x a plain server's images/s at 32 clients, p99 <= {GOAL_P99 * 1000:g} ms at 8",
        f"{speedup:.2f}x, p99 {f['litserve']['8']['p99']['median'] * 1000:.0f} ms",
        "met" if a == b == "met" else "not met" if "not met" in (a, b) else "not shown",
    )


def limit(r: dict) -> str:
    """What batching can gain at most with this model on this CPU (``ceiling``); older results have no figure."""
    if "ceiling" not in r:
        return ""
    b = r["ceiling"]
    us = {k: v * 1e6 for k, v in b.items() if k != "bound"}
    return f"""
What batching can gain at most here (same model, one thread, no HTTP; `ceiling` in `bench/serve.py`): per image,
decoding the request's PNG takes {us["decode"]:.0f} µs and the forward pass {us["forward_1"]:.0f} µs alone or
{us["forward_32"]:.0f} µs in a batch of 32. Batching shares only the forward pass, so a batching server answers at
most {b["bound"]:.2f}x the images per CPU second of a one-request-one-forward server, before the HTTP and
process-hop costs both pay: the {GOAL_SPEEDUP:g}x goal needs a model whose forward pass dominates and gains from
batching (a GPU), not this CPU.
"""


def render(r: dict) -> str:
    f = r["figures"]
    ms = lambda s: {k: [x * 1000 for x in v] if k == "runs" else v * 1000 for k, v in s.items()}  # noqa: E731
    rows = []
    for c in CLIENTS:
        a, b = f["litserve"][str(c)], f["plain"][str(c)]
        rows.append(
            f"| {c} | {fmt(a['images_per_s'], '.0f')} | {fmt(b['images_per_s'], '.0f')} | "
            f"{a['images_per_s']['median'] / b['images_per_s']['median']:.2f}x | "
            f"{fmt(ms(a['p50']), '.1f')} / {fmt(ms(a['p99']), '.1f')} | "
            f"{fmt(ms(b['p50']), '.1f')} / {fmt(ms(b['p99']), '.1f')} |"
        )
    speedup, p99 = judge(r)
    source = "trained briefly in this run" if r["args"]["ckpt"] is None else f"given: `{r['args']['ckpt']}`"
    return f"""
The main job's model (`configs/fashion_mnist.yaml`, {source}) served two ways on CPU, each started afresh per run
({r["args"]["runs"]} runs per side, alternating): `{SERVE.format(ckpt="last.ckpt")}` (LitServe with its defaults:
one model worker, dynamic batches of up to 32) and a plain FastAPI + uvicorn server, one forward pass per request,
one process per core. Both read each PNG file with `project.data.images.read_image` and answer the same JSON (largest
probability difference between them on 32 files: {r["same_answers_max_difference"]:.1e}). Clients send real
Fashion-MNIST test images one request after another for {r["args"]["seconds"]:g} s per client count; failed requests:
{r["failures"]}. Median (min–max) of the runs; latencies in ms.

| clients | LitServe images/s | plain images/s | LitServe / plain | LitServe p50 / p99 | plain p50 / p99 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Goals: at least {GOAL_SPEEDUP:g}x the plain server's images/s at 32 clients: {judged(speedup)}; p99 latency at most
{GOAL_P99 * 1000:g} ms at 8 clients: {judged(p99, MIXED)}. The load client runs on the same cores as the servers.
{limit(r)}
{footer(r)}
"""


if __name__ == "__main__":
    main()
