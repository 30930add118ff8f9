"""The README's promises, run as a user runs them: every `python -m project|extras...` command in README.md, in the
order written, in one fresh folder holding small format-exact data where the README says data goes, the files the README
shows (`# my_nets.py`, `# tiny.yaml`, ...) written from its own code blocks. Each command runs through `runpy`
exactly as `python -m` runs it, all in one separate process (a process each would cost 7 s of imports), with epoch,
batch and batch-size limits appended. The main job also runs as a process of its own: its console must be clean."""

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from tests.conftest import EXTRAS_TESTS, QUIET, ROOT, run_module

README = ROOT / "README.md"
LIMITS = [f"--trainer.limit_{stage}_batches=1" for stage in ("train", "val", "test", "predict")]
SMALL_BATCHES = ["--data.batch_size=4", "--data.eval_batch_size=4"]  # ResNet-18 at 224x224: one batch of 4 suffices


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [re.sub(r"\s+#.*", "", line) for line in lines if line.startswith(("python -m project", "python -m extras"))]


def shown_files() -> dict[str, str]:
    """Code blocks whose first line names a file: ``# my_nets.py``."""
    return {m[1]: m[2] for m in re.finditer(r"```\w+\n# ([\w.]+\.\w+)\n(.*?)```", README.read_text(), re.S)}


def as_run(command: str) -> tuple[str, list[str], str | None]:
    """Module, arguments with the test's limits, and the file stdout is redirected to."""
    words = shlex.split(command)
    output = words[words.index(">") + 1] if ">" in words else None
    words = words[: words.index(">")] if output else words
    module, args = words[2], words[3:]
    if module == "project" and args[0] in ("fit", "validate", "test", "predict"):
        args += [*QUIET, *LIMITS, *SMALL_BATCHES, "--data.num_workers=0"]
        args += ["--trainer.max_epochs=1"] if args[0] == "fit" else []
        args += ["--data.val_split=0.2"] if any("cifar" in a for a in args) else []
    if module == "extras.sweep":  # one trial (its best.yaml is the next command's), with the limits above
        args += ["--trials=1", *QUIET, *LIMITS[:2]]
    return module, args, output


def test_readme_shows_the_main_commands():
    found = commands()
    assert len(found) >= 15 and "python -m project fit --config configs/fashion_mnist.yaml" in found
    assert {"my_nets.py", "tiny.yaml", "my_images.yaml"} <= set(shown_files())


@pytest.mark.processes  # about twenty commands
@pytest.mark.extras  # python -m extras.export, ...
def test_every_readme_command_runs_as_written(tmp_path, mnist_root, cifar_root, image_root):
    shutil.copytree(mnist_root, tmp_path / "data")
    shutil.copytree(cifar_root[0], tmp_path / "data", dirs_exist_ok=True)
    shutil.copytree(image_root, tmp_path / "my_images")
    shutil.copytree(image_root / "red", tmp_path / "new_images")  # unlabelled images to predict
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for name, text in shown_files().items():
        (tmp_path / name).write_text(text)
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")  # stands in for the downloaded weights
    md5 = {n: {k: cifar_root[1][n][k] for k in ("train_list", "test_list", "meta")} for n in (10, 100)}
    (tmp_path / "cifar-md5.json").write_text(json.dumps(md5))
    (tmp_path / "commands.json").write_text(json.dumps([as_run(c) for c in commands()]))
    done = run_module("tests.test_readme", str(tmp_path), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ran = done.stdout.count("ran: python -m ")
    assert ran == len(commands()), done.stdout[-3000:]
    assert len(list((tmp_path / "runs").rglob("config.yaml"))) >= 10 and (tmp_path / "my.yaml").is_file()
    assert list((tmp_path / "runs" / "image_folder").rglob("predictions.csv"))


def test_the_main_job_command_runs_with_a_clean_console(mnist_root, tmp_path):
    """What a new user sees from the main job and then predict: the progress bar, the metrics, the W&B line, and
    nothing that looks like a problem."""
    shutil.copytree(mnist_root, tmp_path / "data")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for command, shown in (
        (["fit", "--config", "configs/fashion_mnist.yaml", "--trainer.max_epochs=1"], "test/acc"),
        (["predict", "-c", "runs/fashion_mnist/version_0/config.yaml", "--ckpt_path", "last"], "predictions of"),
    ):
        done = run_module(
            "project", *command, *LIMITS, cwd=tmp_path, WANDB_MODE=None, WANDB_API_KEY=None, HOME=str(tmp_path)
        )
        assert done.returncode == 0, done.stderr[-3000:]
        console = done.stdout + done.stderr
        assert shown in console and "W&B run saved offline" in console
        noise = [
            line
            for line in console.splitlines()
            if re.search(r"warn|deprecat|traceback|error|litlogger|FLOPs: 0\b|not recommended|has changed", line, re.I)
        ]
        assert noise == [], noise


FORK_SAMPLE = [  # training, checkpoints, W&B offline read back, faults: a cross-section of the core
    "tests/test_wandb.py::test_a_resumed_fit_continues_the_same_run",
    "tests/test_cli.py::test_optimizer_and_scheduler_overrides_take_effect",
    "tests/test_faults.py::test_checkpoint_writes_are_atomic_and_finite",
    "tests/test_configs.py::test_config_prints_round_trips_and_runs[prune]",  # an extra's: skipped
]
FORK_PYTEST = """import sys
sys.modules["extras"] = sys.modules["bench"] = None  # deleted (the editable install would still find them)
import pytest
common = ["-p", "no:cacheprovider", "-n", "0", "-q"]
sys.exit(pytest.main([*common, "--collect-only"]) or pytest.main([*common, "-rs", *sys.argv[1:]]))
"""


@pytest.mark.processes  # a pytest run of its own
def test_a_fork_without_extras_and_bench_keeps_its_tests(tmp_path):
    """The README's promise that a fork may delete extras/ (and bench/): in a copy of the repository without them,
    pytest collects every test module of the core (the extras' own are left out, the core's tests of extras
    skipped) and passes a cross-section of the core's tests."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    fork = tmp_path / "fork"
    for name in listed.stdout.splitlines():
        if not name.startswith(("extras/", "bench/")) and (ROOT / name).is_file():
            (fork / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, fork / name)
    env = {**os.environ, "PYTHONPATH": str(fork)}
    done = subprocess.run(
        [sys.executable, "-c", FORK_PYTEST, *FORK_SAMPLE], cwd=fork, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "3 passed, 1 skipped" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "uses extras/, which this checkout does not have" in done.stdout
    modules = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    core = {f"tests/{p.name}" for p in (fork / "tests").glob("test_*.py") if p.name not in EXTRAS_TESTS}
    assert modules == core and "tests/test_wandb.py" in core, sorted(modules ^ core)


def main(folder: str) -> None:
    """Run the prepared commands (``python -m tests.test_readme FOLDER``), stopping at the first that fails."""
    from torchvision import datasets

    for n, lists in json.loads(Path(folder, "cifar-md5.json").read_text()).items():
        for attr, value in lists.items():
            setattr(datasets.CIFAR10 if n == "10" else datasets.CIFAR100, attr, value)
    sys.path.insert(0, folder)  # my_nets.py, where the user put it
    for module, args, output in json.loads(Path(folder, "commands.json").read_text()):
        start = time.perf_counter()
        sys.argv = [f"python -m {module}", *args]
        out = open(output, "w") if output else sys.stdout  # noqa: SIM115
        try:
            with redirect_stdout(out):
                if module == "extras.serve":  # a server runs until stopped: started, asked once, stopped
                    from tests.test_serve import answers_once

                    answers_once(args, Path(folder))
                else:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            if exit.code not in (0, None):
                print(f"failed ({exit.code}): python -m {module} {shlex.join(args)}")
                raise
        finally:
            if output:
                out.close()
        print(f"ran: python -m {module} {shlex.join(args)} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
