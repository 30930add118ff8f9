"""Hostile files and leaked secrets: a checkpoint never runs code when loaded; keys in the environment never reach
an output file."""

import os
import subprocess
import sys

import pytest
import torch

from project.cli import cli_main
from project.errors import UserError
from tests.conftest import CONFIGS, ROOT, fast_args

MNIST = str(CONFIGS / "mnist.yaml")


class Evil:
    """Unpickling this object creates ``marker``: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def evil_ckpt(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": Evil(str(marker))}}, path)
    # the file really is dangerous: a plain pickle load runs the payload
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("subcommand", ["validate", "test", "fit"])
def test_malicious_checkpoint_is_refused(subcommand, evil_ckpt, capsys, mnist_root, monkeypatch):
    path, marker = evil_ckpt
    # neither --weights_only=false nor torch's escape hatch may turn the safe loading off
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, f"--config={MNIST}", *fast_args(mnist_root), f"--ckpt_path={path}",
                  "--weights_only=false"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"refused to load {path}" in lines[0] and "could run code" in lines[0]
    assert not marker.exists()


def test_trainer_checkpoint_loading_is_weights_only(evil_ckpt, mnist_root, monkeypatch):
    """Lightning's own path (trainer.validate(ckpt_path=...)) goes through the CLI's checkpoint IO."""
    path, marker = evil_ckpt
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cli = cli_main(["--config", MNIST, *fast_args(mnist_root)], run=False)
    with pytest.raises(UserError, match="refused to load"):
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=path, weights_only=False)
    assert not marker.exists()


SECRETS = {
    "WANDB_API_KEY": "fakewandbkey0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_fakeTokenForTheLeakTest123",
    "MY_SERVICE_SECRET": "s3cr3t-value-for-the-leak-test",
    "OPENAI_API_KEY": "sk-fake-openai-key-for-the-leak-test",
}


def test_secrets_never_reach_output_files(tmp_path, mnist_root):
    """A real process (W&B offline and CSV logs, fit + test) with planted keys: no file and no console line has them."""
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    args = ["fit", f"--config={MNIST}", *fast_args(mnist_root), "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--test_after_fit=true",
            "--trainer.logger+=project.loggers.WandbLogger"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "project", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "mnist" / "version_0"
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "checkpoints").glob("*.ckpt"))
    assert list(tmp_path.rglob("*.wandb")), "the offline W&B run wrote its files"
    outputs = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(outputs) >= 5
    for name, value in SECRETS.items():
        needle = value.encode()
        leaked = [str(p) for p in outputs if needle in p.read_bytes()]
        assert not leaked, f"{name} found in {leaked}"
        assert value not in done.stdout + done.stderr
