"""Compression: pruning reaches its sparsity, a student learns from the teacher's logits, int8 quantization."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from project.cli import cli_main
from project.export import load_net
from project.models.distill import distillation_loss
from tests.conftest import CONFIGS, fast_args

FMNIST = f"--config={CONFIGS / 'fashion_mnist.yaml'}"


@pytest.fixture(scope="module")
def teacher(mnist_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    cli = cli_main(["fit", FMNIST, *fast_args(mnist_root), "--model.init_args.net.init_args.width=8",
                    "--trainer.max_epochs=3", "--data.init_args.batch_size=32", "--data.init_args.loader=torchvision",
                    f"--trainer.default_root_dir={folder}",
                    f"--trainer.logger.init_args.save_dir={folder}"])  # fmt: skip
    assert float(cli.trainer.callback_metrics["test/acc"]) > 0.5
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def sparsity(state: dict[str, torch.Tensor], names: list[str]) -> float:
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros / sum(state[n].numel() for n in names)


def test_pruning_reaches_the_configured_sparsity(mnist_root):
    cli = cli_main(["fit", FMNIST, f"--config={CONFIGS / 'compress' / 'prune.yaml'}", *fast_args(mnist_root),
                    "--model.init_args.net.init_args.width=8", "--trainer.max_epochs=2",
                    "--data.init_args.batch_size=32"])  # fmt: skip
    checkpoint = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.endswith(("_orig", "_mask"))], "pruning is made permanent in checkpoints"
    prunable = [f"{n}.weight" for n, m in cli.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sparsity(state, prunable) == pytest.approx(1 - 0.7**2, abs=0.01)  # 30% of what is left, twice
    assert float(cli.trainer.callback_metrics["test/acc"]) > 0.3  # still a classifier (chance is 0.1)


def test_student_learns_from_the_teacher_logits_alone(teacher, mnist_root):
    """alpha=1: the labels are never used in training, yet the student moves to the teacher and above chance."""
    cli = cli_main([FMNIST, f"--config={CONFIGS / 'compress' / 'distill.yaml'}", *fast_args(mnist_root),
                    f"--model.init_args.teacher_ckpt={teacher}", "--model.init_args.alpha=1.0",
                    "--model.init_args.net.init_args.width=4", "--trainer.max_epochs=3",
                    "--data.init_args.batch_size=32", "--data.init_args.loader=torchvision",
                    "--test_after_fit=false"], run=False)  # fmt: skip
    student = cli.model
    teacher_net = student.teacher
    teacher_before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    assert not any(p.requires_grad for p in teacher_net.parameters())
    assert len(list(student.parameters())) == len(list(student.net.parameters()))  # the teacher is not trained

    cli.datamodule.setup("fit")
    x = torch.stack([cli.datamodule.datasets["val"][i][0] for i in range(60)])

    def disagreement() -> float:
        student.eval()
        with torch.no_grad():
            return float(distillation_loss(student(x), teacher_net(x), temperature=1.0))

    before = disagreement()
    cli.trainer.fit(student, datamodule=cli.datamodule)
    after = disagreement()
    assert after < 0.5 * before
    for k, v in teacher_net.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.3  # chance is 0.1; no labels were used
    saved = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert not [k for k in saved["state_dict"] if not k.startswith("net.")]  # the student alone
    student_net, hparams = load_net(cli.trainer.checkpoint_callback.last_model_path)  # loads without the teacher
    assert hparams["net"]["init_args"]["width"] == 4


def test_distillation_loss_gradient_reaches_only_the_student():
    student_logits = torch.randn(4, 3, requires_grad=True)
    teacher_logits = torch.randn(4, 3, requires_grad=True)
    assert float(distillation_loss(teacher_logits, teacher_logits, 3.0)) == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(student_logits, teacher_logits.detach(), temperature=3.0)
    loss.backward()
    assert student_logits.grad.abs().sum() > 0 and teacher_logits.grad is None


def test_int8_quantization_keeps_accuracy(teacher, tmp_path, capsys):
    """The teacher (a conv net) quantized to int8: integer ops inside, smaller file, accuracy within 3 points."""
    from project.compress import main

    run_config = teacher.parents[1] / "config.yaml"
    out = tmp_path / "int8"
    main(["--run_config", str(run_config), "--ckpt_path", str(teacher), "--output_dir", str(out)])
    report = json.loads((out / "quantization.json").read_text())
    assert {"ConvInteger", "MatMulInteger"} <= set(report["int8"]["int8_ops"])
    assert report["int8"]["bytes"] < 0.7 * report["fp32"]["bytes"]  # a tiny net: graph overhead weighs in
    assert report["fp32"]["accuracy"] > 0.5 and report["accuracy_drop"] <= 0.03
    assert "accuracy drop" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # never overwrites an earlier report
        main(["--run_config", str(run_config), "--ckpt_path", str(teacher), "--output_dir", str(out)])
