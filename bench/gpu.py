"""GPU: measured only where torch sees a CUDA GPU; elsewhere the section says so. On a GPU: the main job
(``python -m project fit -c configs/fashion_mnist.yaml``, which then runs on it) and the steady training throughput
of the Overhead run on the GPU at ``32-true`` vs ``16-mixed`` precision, interleaved.

    python bench/gpu.py [--runs 3] [--precision-runs 5] [--steps 300]
"""

import shlex
import time

from common import (
    OVERLAP,
    PYTHON,
    fmt,
    footer,
    interleave,
    parser,
    percent,
    prepare_fashion_mnist,
    provenance,
    runs_in_order,
    save,
    spread,
    timed,
)
from main_job import COMMAND, run
from overhead import cli_command, steady

NAME, TITLE = "gpu", "GPU"
ANSWER = {"met": "yes, in every run", "not met": "no, in no run", "not shown": "not shown (" + OVERLAP + ")"}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=3, help="main job runs")
    p.add_argument("--precision-runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--extra", default="", help="more CLI arguments for the main job (trying out only)")
    p.add_argument("--force", action="store_true", help="run even without a GPU (trying out only)")
    args = p.parse_args()
    import torch

    started, prov = time.time(), provenance()
    if not (torch.cuda.is_available() or args.force):
        print(render(save(NAME, p, args, prov, {"measured": False}, started)))
        return
    prepare_fashion_mnist()
    walls, accs = zip(*(run(shlex.split(args.extra)) for _ in range(args.runs)), strict=True)

    def rate(precision: str) -> float:
        command = cli_command(args.steps, 30) + f" --trainer.accelerator auto --trainer.precision {precision}"
        return steady(timed([PYTHON, *command.split()[1:]])["output"])

    fp32, fp16 = interleave(args.precision_runs, lambda: rate("32-true"), lambda: rate("16-mixed"), ("32", "16"))
    data = {"measured": True, "wall": spread(walls), "acc": spread(accs), "fp32": spread(fp32), "fp16": spread(fp16)}
    print(render(save(NAME, p, args, prov, data, started)))


def summary(r: dict) -> tuple[str, str, str]:
    if not r["measured"]:
        return "GPU figures", "not measured: no GPU on this machine", "-"
    return "main job on the GPU (no goal)", f"{r['acc']['median']:.2%} in {r['wall']['median']:.0f} s", "-"


def render(r: dict) -> str:
    if not r["measured"]:
        return f"\nNot measured: no GPU on this machine (`torch.cuda.is_available()` is false).\n\n{footer(r)}\n"
    gpu = r["provenance"]["gpu"] or "no GPU (run with --force)"
    fp32, fp16 = r["fp32"], r["fp16"]
    from common import verdict

    faster = verdict(fp16["runs"], fp32["runs"], 1.0, at_most=False)
    return f"""
On {gpu}. Main job: `{COMMAND}` ({r["args"]["runs"]} runs, as in Main job but on the GPU): wall
{fmt(r["wall"], ".1f")} s, test accuracy {fmt(percent(r["acc"]))} %.

Training throughput of the Overhead run (`{cli_command(r["args"]["steps"], 30)} --trainer.accelerator auto
--trainer.precision ...`), interleaved, {r["args"]["precision_runs"]} runs each: median (min–max).

| precision | steps/s after warm-up | each run, in order |
|---|---|---|
| `32-true` | {fmt(fp32)} | {runs_in_order(fp32)} |
| `16-mixed` | {fmt(fp16)} | {runs_in_order(fp16)} |

`16-mixed` / `32-true`: {fp16["median"] / fp32["median"]:.2f}x; `16-mixed` faster: {ANSWER[faster]}.

{footer(r)}
"""


if __name__ == "__main__":
    main()
