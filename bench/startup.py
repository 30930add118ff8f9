"""Start-up: wall time of ``python -m project fit --help`` vs a bare ``import lightning.pytorch, torchvision``.

python bench/startup.py [--repeats 7]
"""

import argparse

from common import PYTHON, interleave, machine, median, timed_command, write_section


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cli = [PYTHON, "-m", "project", "fit", "--help"]
    bare = [PYTHON, "-c", "import lightning.pytorch, torchvision"]
    a, b = interleave(lambda: timed_command(cli)[0], lambda: timed_command(bare)[0], args.repeats)
    ratio = median(a) / median(b)
    write_section(
        "Start-up",
        f"""
`{" ".join(["python", *cli[1:]])}` vs `python -c "import lightning.pytorch, torchvision"`, interleaved,
{args.repeats} runs each, medians. Machine: {machine()}.

| command | median wall (s) |
|---|---|
| `python -m project fit --help` | {median(a):.2f} |
| bare imports | {median(b):.2f} |

**Ratio {ratio:.2f}x** (goal <= 1.3x: {"met" if ratio <= 1.3 else "not met"}). Reproduce: `python bench/startup.py`.
""",
    )


if __name__ == "__main__":
    main()
