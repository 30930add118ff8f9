"""Bad input: one `error:` line saying what is wrong and how to fix it, exit code 2, no traceback, nothing on disk
changed. Hostile files: loading a checkpoint never runs code. Secrets never reach an output file."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from project.cli import cli_main
from project.errors import UserError
from tests.conftest import CONFIGS, CSV, QUIET, fails, fit, run_module

MNIST = f"--config={CONFIGS / 'mnist.yaml'}"


def mnist(data_dir: Path | str, *extra: str) -> list[str]:
    """The options of ``fit`` on the MNIST config, quiet, with CSV logs, and ``extra``."""
    return [MNIST, CSV, f"--data.init_args.data_dir={data_dir}", *QUIET, *extra]


def snapshot(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in roots for p in Path(r).rglob("*") if p.is_file()
    }


def fails_untouched(args: list[str], capsys, *roots: Path) -> str:
    """Exit 2 with one line, and no file under the cwd or ``roots`` created, changed or removed."""
    before = snapshot(Path.cwd(), *roots)
    line = fails(args, capsys)
    assert snapshot(Path.cwd(), *roots) == before
    return line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_epocs=3"], "unknown option --trainer.max_epocs (did you mean --trainer.max_epochs?)"),
        (["--data.init_args.batch_sise=8"], "MNISTDataModule has no parameter 'batch_sise'"),
        (["--model.init_args.net.init_args.hiden=[8]"], "MLP has no parameter 'hiden'"),
        (["--trainer.max_epochs=abc"], "trainer.max_epochs: Expected a <class 'int'>, got abc"),
        (["--model.init_args.optimizer.init_args.lr=fast"], "Expected a <class 'float'>"),
        (["--model.init_args.net.class_path=project.models.nets.Mlp"], "has no attribute 'Mlp'"),
        (["--data=project.data.MNISTDataModul"], "has no attribute 'MNISTDataModul'"),
        (["--model.init_args.net=nowhere.Net"], "No module named 'nowhere'"),
        (["--data.init_args.val_split=1.5"], "--data.val_split must be a count >= 0 or a fraction in [0, 1), got 1.5"),
        (["--data.init_args.batch_size=0"], "--data.batch_size must be at least 1, got 0"),
        (["--data.init_args.num_workers=-1"], "--data.num_workers must be 0 or more, got -1"),
        (["--data.init_args.eval_batch_size=0"], "--data.eval_batch_size must be at least 1"),
        (["--model.init_args.label_smoothing=1.5"], "--model.label_smoothing must be in [0, 1), got 1.5"),
        (["--model.init_args.class_weights=[1.0,2.0]"], "--model.class_weights needs 10 values"),
        (["--prediction_writer.top_k=0"], "--prediction_writer.top_k must be at least 1"),
        (["--trainer.default_root_dir=blocker/runs"], "cannot write to blocker/runs: set --trainer.default_root_dir"),
        (["--checkpoint.dirpath=blocker/ckpt"], "cannot write to blocker/ckpt: set --checkpoint.dirpath"),
        (["--ckpt_path=runs/x/last.ckpt"], "--ckpt_path runs/x/last.ckpt: no such file"),
        (["--ckpt_path=last"], "--ckpt_path last: no checkpoints/last.ckpt next to the given configs"),
    ],
)
def test_bad_value_on_the_command_line(args, expected, capsys, mnist_root, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder (root ignores permission bits, not this)\n")
    line = fails_untouched(["fit", *mnist(mnist_root, *args)], capsys, mnist_root)
    assert expected in line, line


def test_bad_subcommand_config_file_or_yaml(tmp_path, capsys):
    assert "fti" in fails_untouched(["fti"], capsys)
    (tmp_path / "mine.yaml").write_text("trainer:\n  max_epocs: 3\n")
    assert "--trainer.max_epocs (did you mean --trainer.max_epochs?)" in fails_untouched(
        ["fit", MNIST, "-c", "mine.yaml"], capsys
    )
    assert "nope.yaml" in fails_untouched(["fit", "--config=nope.yaml"], capsys)
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: [1\nmodel: {}\n")
    line = fails_untouched(["fit", MNIST, "--config=broken.yaml"], capsys)
    assert line.startswith("error: YAML syntax error in broken.yaml (line 3, column 6): did not find expected ','")


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    """``--debug`` (or PROJECT_DEBUG=1): the error is raised, and Python prints its traceback, exit code 1."""
    done = run_module("project", "fit", "--config=nope.yaml", "--debug", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback (most recent call last):" in done.stderr, done.stderr[-3000:]
    assert "project.errors.UserError: " in done.stderr and "nope.yaml" in done.stderr.splitlines()[-1]
    assert not [line for line in done.stderr.splitlines() if line.startswith("error:")]
    monkeypatch.setenv("PROJECT_DEBUG", "1")
    with pytest.raises(UserError, match="nope.yaml"):
        cli_main(["fit", "--config=nope.yaml"])


class Evil:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_missing_optional_package_is_one_line_naming_the_extra(capsys, mnist_root, tmp_path, monkeypatch):
    """`pip install -e .` alone has no tensorboard: the logger config says which extra brings it."""
    import lightning.fabric.loggers.tensorboard as tensorboard

    monkeypatch.setattr(tensorboard, "_TENSORBOARD_AVAILABLE", False)  # as Lightning finds it when not installed
    monkeypatch.setattr(tensorboard, "_TENSORBOARDX_AVAILABLE", False)
    logger = f"--config={CONFIGS / 'logger' / 'tensorboard.yaml'}"
    data = [f"--data.init_args.data_dir={mnist_root}", f"--trainer.default_root_dir={tmp_path / 'runs'}", *QUIET]
    line = fails_untouched(["fit", MNIST, logger, *data], capsys, tmp_path)
    assert "`tensorboard`" in line and line.endswith(': pip install -e ".[tensorboard]" installs it'), line


def test_bad_checkpoints_are_refused_with_one_line(tmp_path, capsys, mnist_root, cifar_root, monkeypatch):
    small = ["--model.init_args.net.init_args.hidden=[16]", "--trainer.enable_checkpointing=true"]
    cli = fit("mnist.yaml", mnist_root, "--trainer.fast_dev_run=1", *small)
    cli.trainer.save_checkpoint("mnist.ckpt")  # a real checkpoint of the MNIST config (an MLP, 10 classes, 1x28x28)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": Evil(str(marker))}}, "evil.ckpt")
    torch.load("evil.ckpt", weights_only=False)  # the file really is dangerous: a plain load runs the payload
    assert marker.exists()
    marker.unlink()
    (tmp_path / "notes.ckpt").write_text("these are my notes, not weights\n")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {"hidden_dim": 64}}, "other.ckpt")
    torch.save({"encoder.weight": torch.zeros(2)}, "bare.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # neither this nor --weights_only=false turns it off
    base = mnist(mnist_root, "--weights_only=false")
    for subcommand in ("validate", "test", "fit"):
        line = fails_untouched([subcommand, *base, "--ckpt_path=evil.ckpt"], capsys)
        assert "refused to load evil.ckpt" in line and "could run code" in line and not marker.exists()
    with pytest.raises(UserError, match="refused to load"):  # Lightning's own checkpoint loading too
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="evil.ckpt", weights_only=False)
    assert not marker.exists()
    assert "notes.ckpt is not a readable checkpoint" in fails_untouched(
        ["validate", *base, "--ckpt_path=notes.ckpt"], capsys
    )
    line = fails_untouched(["validate", *base, "--ckpt_path=other.ckpt"], capsys)
    assert "comes from another model" in line and "hidden_dim" in line
    assert "not a Lightning checkpoint" in fails_untouched(["validate", *base, "--ckpt_path=bare.ckpt"], capsys)
    # CIFAR-100's data (100 classes, 3x32x32) against the MNIST checkpoint's MLP (10 classes, 1x28x28)
    cifar = [f"--config={CONFIGS / 'cifar100.yaml'}", CSV, f"--data.init_args.data_dir={cifar_root[0]}"]
    split = ["--data.init_args.num_workers=0", "--data.init_args.val_split=0.2"]
    line = fails(["validate", *cifar, *split, "--ckpt_path=mnist.ckpt"], capsys)
    assert "the checkpoint does not fit this model" in line and "saved" in line and "config.yaml" in line


def test_damaged_data_files_are_one_line(tmp_path, capsys, mnist_root, cifar_root, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    shutil.copytree(mnist_root / "MNIST", tmp_path / "data" / "MNIST")
    images = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])
    line = fails(["fit", *mnist("data")], capsys)
    assert "could not read the data set in data" in line and "truncated or corrupt" in line
    shutil.copytree(cifar_root[0] / "cifar-10-batches-py", tmp_path / "cifar" / "cifar-10-batches-py")
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    line = fails(["fit", f"--config={CONFIGS / 'cifar10.yaml'}", CSV, "--data.init_args.data_dir=cifar"], capsys)
    assert "CIFAR10 not found or corrupt" in line and "MD5" in line


def test_an_earlier_run_folder_is_never_overwritten(capsys, mnist_root):
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    args = ["fit", *mnist(mnist_root, *short, "--trainer.logger.init_args.version=0")]
    cli_main(args)
    assert "runs/mnist/version_0 holds an earlier run" in fails_untouched(args, capsys)


SECRETS = {
    "WANDB_API_KEY": "fakewandbkey0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_fakeTokenForTheLeakTest123",
    "MY_SERVICE_SECRET": "s3cr3t-value-for-the-leak-test",
}


def test_secrets_never_reach_output_files(tmp_path, mnist_root):
    """A real process (W&B offline and CSV logs, fit + test) with planted keys: no file or console line has them."""
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2"]
    args = [MNIST, f"--data.init_args.data_dir={mnist_root}", *QUIET, "--test_after_fit=true", *short]
    csv = "--trainer.logger+=lightning.pytorch.loggers.CSVLogger"
    done = run_module("project", "fit", *args, csv, cwd=tmp_path, WANDB_MODE="offline", **SECRETS)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(list(tmp_path.rglob("*.wandb"))) == 1 and len(list(tmp_path.rglob("*.ckpt"))) == 2
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1 and len(outputs) >= 8
    for name, value in SECRETS.items():
        assert not [str(p) for p in outputs if value.encode() in p.read_bytes()], name
        assert value not in done.stdout + done.stderr
