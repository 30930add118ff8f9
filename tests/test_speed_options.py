"""Speed options take effect: torch.compile, flip TTA, EMA of weights, warmup-cosine; the fast recipes run."""

from pathlib import Path

import pytest
import torch
from torch import nn

from project.cli import cli_main
from project.models import ImageClassifier
from project.models.speed import WarmupCosineLR, compile_problem
from tests.conftest import CONFIGS, fast_args


class LeftHalf(nn.Module):
    """Logits from the left half of the image only: not mirror invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].flatten(1)
        return torch.stack([left.sum(1), -left.sum(1)], dim=1)


def test_tta_flip_averages_mirrored_logits() -> None:
    x = torch.rand(4, 1, 6, 6)
    y = torch.zeros(4, dtype=torch.long)
    plain = ImageClassifier(LeftHalf(), num_classes=2).eval()
    tta = ImageClassifier(LeftHalf(), num_classes=2, tta_flip=True).eval()
    _, logits_plain, _ = plain._shared_step((x, y))
    _, logits_tta, _ = tta._shared_step((x, y))
    torch.testing.assert_close(logits_plain, LeftHalf()(x))
    torch.testing.assert_close(logits_tta, (LeftHalf()(x) + LeftHalf()(x.flip(-1))) / 2)
    assert not torch.allclose(logits_plain, logits_tta)
    tta.train()  # training is never mirrored-averaged
    torch.testing.assert_close(tta._shared_step((x, y))[1], logits_plain)


def test_compile_takes_effect_and_keeps_state_dict_keys() -> None:
    torch._dynamo.reset()
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model = ImageClassifier(net, num_classes=2, compile={"backend": "eager"})
    plain = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), num_classes=2)
    assert set(model.state_dict()) == set(plain.state_dict())
    model.setup("fit")  # compiled when the trainer sets the model up
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model(torch.rand(3, 1, 2, 2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # dynamo traced the net


def test_compile_problem_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = compile_problem({})
    assert problem and "C++ compiler" in problem
    assert compile_problem({"backend": "eager"}) is None
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(CONFIGS / "fashion_mnist.yaml"), "--model.init_args.compile=true"])
    assert exc.value.code == 2


def test_warmup_cosine_shape() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then decays
    assert lrs[-1] < 0.01


def test_ema_and_warmup_cosine_through_the_cli(mnist_root: Path) -> None:
    """EMA (Lightning's EMAWeightAveraging) leaves the averaged weights in the model; WarmupCosineLR's
    total_steps is filled with the run's number of steps."""
    common = [
        "--config",
        str(CONFIGS / "fashion_mnist.yaml"),
        "--model.init_args.net.init_args.width=4",
        "--trainer.max_epochs=2",
        "--trainer.limit_val_batches=1",
        "--test_after_fit=false",
        "--data.init_args.loader=tensor",
        "--model.init_args.scheduler=project.models.speed.WarmupCosineLR",
        "--model.init_args.scheduler.warmup=0.2",
    ]
    ema = cli_main(
        [
            "fit",
            *fast_args(mnist_root, *common),
            "--trainer.callbacks+=EMAWeightAveraging",
            "--trainer.callbacks.decay=0.5",
        ]
    )
    plain = cli_main(["fit", *fast_args(mnist_root, *common)])
    callback = next(c for c in ema.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging")
    averaged = dict(callback._average_model.module.named_parameters())
    for name, param in ema.model.named_parameters():
        torch.testing.assert_close(param, averaged[name])
    ema_w = ema.model.net.head[1].weight
    plain_w = plain.model.net.head[1].weight
    assert not torch.allclose(ema_w, plain_w)  # the averaged weights differ from the last ones
    sched = plain.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, WarmupCosineLR) and sched.total_steps == plain.trainer.global_step


@pytest.mark.parametrize(
    ("recipe", "root_fixture"), [("fashion_mnist_fast.yaml", "mnist_root"), ("cifar10_fast.yaml", "cifar_root")]
)
def test_fast_recipes_run(recipe: str, root_fixture: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(root_fixture)
    root = root[0] if isinstance(root, tuple) else root
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "experiment" / recipe),
            *fast_args(root, "--data.init_args.val_split=0.1"),
            "--trainer.fast_dev_run=1",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.datamodule.loader == "tensor"
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["test/loss"].item()))
