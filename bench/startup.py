"""Start-up: wall time of ``python -m project fit --help`` vs a bare ``import lightning.pytorch, torchvision``,
each a fresh process, interleaved.

    python bench/startup.py [--runs 7]
"""

import time

from common import (
    PYTHON,
    fmt,
    footer,
    interleave,
    judged,
    parser,
    provenance,
    runs_in_order,
    save,
    spread,
    timed,
    verdict,
)

NAME, TITLE, GOAL = "startup", "Start-up", 1.1
CLI = "python -m project fit --help"
BARE = 'python -c "import lightning.pytorch, torchvision"'


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    started, prov = time.time(), provenance()
    cli, bare = interleave(
        args.runs,
        lambda: timed([PYTHON, "-m", "project", "fit", "--help"])["wall"],
        lambda: timed([PYTHON, "-c", "import lightning.pytorch, torchvision"])["wall"],
        ("cli", "bare"),
    )
    print(render(save(NAME, p, args, prov, {"cli": spread(cli), "bare": spread(bare)}, started)))


def judge(r: dict) -> str:
    return verdict(r["cli"]["runs"], r["bare"]["runs"], GOAL, at_most=True)


def summary(r: dict) -> tuple[str, str, str]:
    return (
        f"`fit --help` / bare imports, wall <= {GOAL}x",
        f"{r['cli']['median'] / r['bare']['median']:.2f}x",
        judge(r),
    )


def render(r: dict) -> str:
    cli, bare = r["cli"], r["bare"]
    return f"""
`{CLI}` vs `{BARE}`, each a fresh process, interleaved, {r["args"]["runs"]} runs each: median wall seconds
(min–max).

| command | wall (s) | each run, in order |
|---|---|---|
| `{CLI}` | {fmt(cli)} | {runs_in_order(cli)} |
| bare imports | {fmt(bare)} | {runs_in_order(bare)} |

**Ratio {cli["median"] / bare["median"]:.2f}x** (goal <= {GOAL}x: {judged(judge(r))}).

{footer(r)}
"""


if __name__ == "__main__":
    main()
