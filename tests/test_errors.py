"""Bad input: one `error:` line on stderr saying what is wrong and how to fix it, exit code 2, no traceback, and
nothing already on disk changed."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from project.cli import cli_main
from project.data import MNISTDataModule
from tests.conftest import CONFIGS, fast_args

MNIST = str(CONFIGS / "mnist.yaml")


def snapshot(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def fails_with_one_line(args: list[str], capsys, *roots: Path, new_files_allowed: bool = False) -> str:
    """Run the CLI; assert exit 2, exactly one `error:` line and no traceback; files under roots untouched."""
    roots = (Path.cwd(), *roots)
    before = snapshot(*roots)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    after = snapshot(*roots)
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
    if not new_files_allowed:
        assert after == before, f"new files: {set(after) - set(before)}"
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_epocs=3"], "unknown option --trainer.max_epocs (did you mean --trainer.max_epochs?)"),
        (
            ["--data.init_args.batch_sise=8"],
            "has no parameter 'batch_sise' (did you mean batch_size?) (in data.init_args)",
        ),
        (["--model.init_args.net.init_args.hiden=[8]"], "MLP has no parameter 'hiden'"),
        (["--trainer.max_epochs=abc"], "trainer.max_epochs: expected int, got 'abc'"),
        (["--model.init_args.optimizer.init_args.lr=fast"], "optimizer.init_args.lr: expected float, got 'fast'"),
        (["--model.init_args.net.class_path=project.models.nets.Mlp"], "did you mean project.models.nets.MLP?"),
        (["--data=project.data.MNISTDataModul"], "cannot import project.data.MNISTDataModul (did you mean"),
        (["--model.init_args.net=nowhere.Net"], "no module named nowhere"),
        (["--data.init_args.val_split=1.5"], "val_split as a fraction must be in [0, 1), got 1.5"),
    ],
)
def test_bad_value_on_the_command_line(args, expected, capsys, mnist_root):
    line = fails_with_one_line(["fit", f"--config={MNIST}", *fast_args(mnist_root), *args], capsys, mnist_root)
    assert expected in line


def test_unknown_subcommand(capsys):
    assert "unknown subcommand 'fti' (did you mean fit?)" in fails_with_one_line(["fti"], capsys)


def test_unknown_key_in_a_config_file(tmp_path, capsys, mnist_root):
    (tmp_path / "mine.yaml").write_text("trainer:\n  max_epocs: 3\n")
    line = fails_with_one_line(["fit", f"--config={MNIST}", "--config=mine.yaml", *fast_args(mnist_root)], capsys)
    assert "unknown option --trainer.max_epocs (did you mean --trainer.max_epochs?)" in line


def test_missing_config_file(capsys):
    line = fails_with_one_line(["fit", "--config=configs/nope.yaml"], capsys)
    assert "config file not found" in line and "nope.yaml" in line


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: [1\nmodel: {}\n")
    line = fails_with_one_line(["fit", f"--config={MNIST}", "--config=broken.yaml"], capsys)
    assert line.startswith("error: YAML syntax error in broken.yaml (line 3")


def test_invalid_wandb_mode(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    line = fails_with_one_line(["fit", f"--config={MNIST}"], capsys)
    assert "WANDB_MODE='bogus'" in line and "online, offline or disabled" in line


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(Exception, match="nope.yaml"):
        cli_main(["fit", "--config=nope.yaml", "--debug"])
    monkeypatch.setenv("PROJECT_DEBUG", "1")
    with pytest.raises(Exception, match="nope.yaml"):
        cli_main(["fit", "--config=nope.yaml"])


# ---- checkpoints -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_ckpt(tmp_path_factory, mnist_root) -> Path:
    """A real checkpoint of the MNIST config (an MLP, 10 classes)."""
    folder = tmp_path_factory.mktemp("ckpt")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cli = cli_main(["fit", f"--config={MNIST}", *fast_args(mnist_root), "--trainer.fast_dev_run=1",
                        "--model.init_args.net.init_args.hidden=[16]"])  # fmt: skip
        cli.trainer.save_checkpoint(folder / "mnist.ckpt")
    finally:
        os.chdir(cwd)
    return folder / "mnist.ckpt"


def test_ckpt_path_missing(capsys, mnist_root):
    line = fails_with_one_line(["validate", f"--config={MNIST}", "--ckpt_path=runs/x/last.ckpt"], capsys)
    assert "--ckpt_path runs/x/last.ckpt: no such file" in line


def test_ckpt_path_not_a_checkpoint(tmp_path, capsys, mnist_root):
    (tmp_path / "notes.ckpt").write_text("these are my notes, not weights\n")
    line = fails_with_one_line(["validate", f"--config={MNIST}", "--ckpt_path=notes.ckpt"], capsys)
    assert "notes.ckpt is not a readable checkpoint" in line


def test_ckpt_path_from_another_model(tmp_path, capsys, mnist_root):
    # a Lightning checkpoint of some other LightningModule, and a bare state_dict
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {"hidden_dim": 64}}, "other.ckpt")
    line = fails_with_one_line(["validate", f"--config={MNIST}", *fast_args(mnist_root), "--ckpt_path=other.ckpt"],
                               capsys)  # fmt: skip
    assert "comes from another model" in line and "hidden_dim" in line
    torch.save({"encoder.weight": torch.zeros(2)}, "bare.ckpt")
    line = fails_with_one_line(["validate", f"--config={MNIST}", *fast_args(mnist_root), "--ckpt_path=bare.ckpt"],
                               capsys)  # fmt: skip
    assert "not a Lightning checkpoint" in line


def test_num_classes_inconsistent_with_the_checkpoint(capsys, mnist_ckpt, cifar_root):
    root, _ = cifar_root
    # CIFAR-100's data says 100 classes and 3x32x32 images; the checkpoint's MLP was built for 10 and 1x28x28
    line = fails_with_one_line(
        ["validate", f"--config={CONFIGS / 'cifar100.yaml'}", *fast_args(root), "--data.init_args.num_workers=0",
         "--data.init_args.val_split=0.2", f"--ckpt_path={mnist_ckpt}"],
        capsys, mnist_ckpt.parent, root, new_files_allowed=True,
    )  # fmt: skip
    assert "the checkpoint does not fit this model" in line and "saved" in line and "config.yaml" in line


# ---- data ----------------------------------------------------------------------------------------------------
def test_truncated_idx_file(tmp_path, capsys, mnist_root):
    data = tmp_path / "data"
    shutil.copytree(mnist_root / "MNIST", data / "MNIST")
    images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])
    line = fails_with_one_line(["fit", f"--config={MNIST}", *fast_args(data)], capsys, new_files_allowed=True)
    assert "could not read the data set" in line and "truncated or corrupt" in line


def test_corrupt_cifar_batch(tmp_path, capsys, cifar_root, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    root, _ = cifar_root
    data = tmp_path / "data"
    shutil.copytree(root / "cifar-10-batches-py", data / "cifar-10-batches-py")
    batch = data / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    line = fails_with_one_line(["fit", f"--config={CONFIGS / 'cifar10.yaml'}", *fast_args(data)], capsys, data,
                               new_files_allowed=True)  # fmt: skip
    assert "CIFAR10 not found or corrupt" in line and "MD5" in line


class DropLastMNIST(MNISTDataModule):
    """MNIST whose training loader drops the last incomplete batch."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        return torch.utils.data.DataLoader(loader.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_batch_larger_than_the_data_set_with_drop_last(capsys, mnist_root):
    line = fails_with_one_line(
        ["fit", f"--config={MNIST}", *fast_args(mnist_root), "--data=tests.test_errors.DropLastMNIST",
         f"--data.init_args.data_dir={mnist_root}", "--data.init_args.batch_size=1000", "--trainer.max_epochs=1"],
        capsys, mnist_root, new_files_allowed=True,
    )  # fmt: skip
    assert "has 540 samples, fewer than one batch of 1000 with drop_last" in line and "batch_size" in line


# ---- outputs -------------------------------------------------------------------------------------------------
def test_unwritable_output_folder(tmp_path, capsys, mnist_root):
    # Tests may run as root, which ignores permission bits: a path through a regular file is unwritable for anyone.
    (tmp_path / "blocker").write_text("a file, not a folder\n")
    line = fails_with_one_line(
        ["fit", f"--config={MNIST}", *fast_args(mnist_root), "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.logger.init_args.save_dir=blocker/runs"], capsys,
    )  # fmt: skip
    assert line.startswith("error: cannot write") and "blocker" in line and "save_dir" in line


def test_existing_run_folder_is_never_overwritten(capsys, mnist_root):
    args = ["fit", f"--config={MNIST}", *fast_args(mnist_root), "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.logger.init_args.version=0"]  # fmt: skip
    cli_main(args)
    line = fails_with_one_line(args, capsys)
    assert "runs/mnist/version_0 holds an earlier run and is never overwritten" in line
