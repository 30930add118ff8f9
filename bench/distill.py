"""Distillation on real Fashion-MNIST: does the shipped recipe's student beat the same net trained alone?

The teacher is the main job trained without label smoothing, as the README says to train a teacher
(``python -m project fit -c configs/fashion_mnist.yaml --model.init_args.label_smoothing 0``, trained here unless
``--teacher`` gives its checkpoint). The student is ``configs/compress/distill.yaml`` stacked after the main job's
config; "alone" is exactly the same (same config files, net, optimizer, schedule, epochs, data order) with the
model class switched back to ``ImageClassifier``, so only the loss differs. Alone and distilled alternate (A B A B
...) with the same seeds (``--seed_everything``); each is a fresh process that tests its best checkpoint on the
10,000 test images. The gain is shown only when every distilled run beats every run alone.

    python bench/distill.py [--seeds 0,1,2] [--teacher CKPT]   # about 20 min on 2 idle CPU cores (teacher: 3)
"""

import re
import shlex
import shutil
import time
from pathlib import Path

import yaml
from common import (
    PYTHON,
    ROOT,
    child_env,
    fmt,
    footer,
    judged,
    parser,
    percent,
    prepare_fashion_mnist,
    provenance,
    runs_in_order,
    save,
    spread,
    timed,
    verdict,
)
from quantize import MAIN_JOB, train_main_job, workspace

NAME, TITLE = "distill", "Distillation"
DISTILLED = "python -m project fit -c configs/fashion_mnist.yaml -c configs/compress/distill.yaml"
TEACHER_FLAG = "--model.init_args.teacher_ckpt"
TEACHER_ARGS = ["--model.init_args.label_smoothing", "0"]  # the README's teacher
OWN = ("teacher_ckpt", "temperature", "alpha")  # DistillationClassifier's own arguments


def alone_config(folder: Path) -> Path:
    """``distill.yaml`` with the model class switched back to ``ImageClassifier`` and its own arguments removed."""
    config = yaml.safe_load((ROOT / "configs" / "compress" / "distill.yaml").read_text())
    config["model"]["class_path"] = "project.models.ImageClassifier"
    config["model"]["init_args"] = {k: v for k, v in config["model"]["init_args"].items() if k not in OWN}
    path = folder / "alone.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_accuracy(cmd: list[str], folder: Path, threads: int) -> float:
    """The test accuracy a fit command prints (its best checkpoint on the test split); CSV logs in ``folder``."""
    done = timed([*cmd, "-c", "configs/logger/csv.yaml"], cwd=folder, env=child_env(OMP_NUM_THREADS=str(threads)))
    found = re.search(r"test/acc\s*[│|]\s*([0-9.]+)", done["output"])
    if not found:
        raise RuntimeError(f"no test/acc in the output of {' '.join(cmd)}:\n{done['output'][-2000:]}")
    return float(found.group(1))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated --seed_everything values, one pair each")
    p.add_argument("--teacher", type=Path, help="the main job's checkpoint, instead of training it here")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (speed only)")
    p.add_argument("--extra", default="", help="more CLI arguments for both sides (trying out only: not published)")
    args = p.parse_args()
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    folder = workspace("bench-distill-")
    settings = yaml.safe_load((ROOT / "configs" / "compress" / "distill.yaml").read_text())["model"]["init_args"]
    try:
        if args.teacher:
            teacher, teacher_acc = args.teacher.resolve(), None
        else:
            teacher, teacher_acc = train_main_job(folder, args.threads, TEACHER_ARGS)
        alone_yaml = alone_config(folder)
        alone, distilled = [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            base = [PYTHON, "-m", "project", "fit", "-c", "configs/fashion_mnist.yaml", f"--seed_everything={seed}"]
            for name, cmd, out in (
                ("alone", [*base, "-c", str(alone_yaml)], alone),
                ("distilled", [*base, "-c", "configs/compress/distill.yaml", f"{TEACHER_FLAG}={teacher}"], distilled),
            ):
                start = time.time()
                out.append(test_accuracy([*cmd, *shlex.split(args.extra)], folder, args.threads))
                print(f"  seed {seed} {name}: test accuracy {out[-1]:.2%} ({time.time() - start:.0f} s)", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gains = [d - a for d, a in zip(distilled, alone, strict=True)]
    data = {
        "teacher": "trained by the main job" if not args.teacher else str(args.teacher),
        "teacher_test_acc": teacher_acc,
        "student": settings["net"],
        "temperature": settings["temperature"],
        "alpha": settings["alpha"],
        "seeds": args.seeds,
        "alone": spread(alone),
        "distilled": spread(distilled),
        "gain": spread(gains),
    }
    print(render(save(NAME, p, args, prov, data, started)))


def judge(r: dict) -> str:
    return verdict(r["distilled"]["runs"], r["alone"]["runs"], 1.0, at_most=False)


def summary(r: dict) -> tuple[str, str, str]:
    a, d = r["alone"]["median"], r["distilled"]["median"]
    return "distilled student > the same net alone", f"{d:.2%} vs {a:.2%}", judge(r)


def render(r: dict) -> str:
    alone, distilled, gain = percent(r["alone"]), percent(r["distilled"]), percent(r["gain"])
    net = r["student"]
    args = ", ".join(f"{k}={v}" for k, v in (net.get("init_args") or {}).items())
    teacher = (
        f"trained in this run, test accuracy {r['teacher_test_acc']:.2%}"
        if r["teacher_test_acc"] is not None
        else f"given: `{r['teacher']}`"
    )
    verdict_text = judged(judge(r), "the runs overlap: the seed-to-seed spread is wider than the gain")
    return f"""
Student: `{net["class_path"].rsplit(".", 1)[-1]}({args})` with the main job's recipe, distilled with
`{DISTILLED} {TEACHER_FLAG} <teacher>` (temperature {r["temperature"]:g}, alpha {r["alpha"]:g}) vs the same
command with the model class switched back to `ImageClassifier` (trained alone on the labels). Teacher: the main job
without label smoothing (`{MAIN_JOB} {" ".join(TEACHER_ARGS)}`), {teacher}. Seeds {r["seeds"]}, one pair
per seed, alternating; test accuracy of each run's best checkpoint on the 10,000 test images. Median (min–max).

| | test accuracy (%) | each seed, in order |
|---|---|---|
| alone | {fmt(alone)} | {runs_in_order(alone)} |
| distilled | {fmt(distilled)} | {runs_in_order(distilled)} |
| gain (points, same seed) | {fmt(gain, "+.2f")} | {runs_in_order(gain, "+.2f")} |

Every distilled run above every run alone: {verdict_text}.

{footer(r)}
"""


if __name__ == "__main__":
    main()
