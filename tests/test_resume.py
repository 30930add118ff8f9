"""Checkpoints and resume: last.ckpt follows every epoch, `--ckpt_path last` resumes the run whose config is given,
and a resumed run ends bit-identical to an uninterrupted one."""

from pathlib import Path

import pytest
import torch

from project.cli import cli_main
from tests.conftest import CONFIGS, fast_args


def args(root: Path, *extra: str) -> list[str]:
    """Tiny MLP with dropout (uses the RNG) and shuffled batches (sampler order), deterministic algorithms."""
    return [*fast_args(root), "--model.init_args.net.init_args.hidden=[16]", "--data.init_args.batch_size=64",
            "--trainer.limit_val_batches=1", "--trainer.deterministic=true", "--test_after_fit=false",
            *extra]  # fmt: skip


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(mnist_root):
    mnist = f"--config={CONFIGS / 'mnist.yaml'}"
    straight = cli_main(["fit", mnist, *args(mnist_root, "--trainer.max_epochs=3")])
    first = cli_main(["fit", mnist, *args(mnist_root, "--trainer.max_epochs=1")])
    first_dir = Path(first.trainer.log_dir)
    resumed = cli_main(["fit", f"--config={first_dir / 'config.yaml'}", "--trainer.max_epochs=3", "--ckpt_path=last"])

    assert Path(resumed.trainer.log_dir).name == "version_2", "the resumed run writes into its own new folder"
    assert Path(resumed.config.fit.ckpt_path).resolve() == (first_dir / "checkpoints" / "last.ckpt").resolve()
    assert resumed.trainer.global_step == straight.trainer.global_step
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    c = first.model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # sanity: epochs 2-3 changed the weights


def test_last_ckpt_follows_every_epoch_not_only_new_bests(mnist_root):
    """lr=0: val/acc never improves after epoch 0. Lightning 2.6's ModelCheckpoint would leave last.ckpt at epoch 0."""
    cli = cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}",
                    *args(mnist_root, "--trainer.max_epochs=3", "--model.optimizer.lr=0",
                          "--trainer.limit_train_batches=2")])  # fmt: skip
    checkpoints = Path(cli.trainer.log_dir) / "checkpoints"
    assert [
        p.name for p in checkpoints.glob("epoch=*.ckpt")
    ] and "epoch=000" in cli.trainer.checkpoint_callback.best_model_path
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6


def test_ckpt_path_last_without_a_run_config_is_one_line(mnist_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", *args(mnist_root), "--ckpt_path=last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --ckpt_path last: no checkpoints/last.ckpt") and "config.yaml" in err[-1]
