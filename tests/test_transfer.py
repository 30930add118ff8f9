"""Transfer learning: a torchvision backbone with a new head, weights from a local file, freeze then unfreeze."""

import pytest
import torch
from lightning.pytorch import Callback
from torchvision import models

from project.cli import cli_main
from project.errors import UserError
from project.models.nets import TorchvisionBackbone
from tests.conftest import CONFIGS
from tests.test_folder import write_image_folder


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_new_head_for_num_classes(arch):
    net = TorchvisionBackbone(num_classes=4, input_shape=(1, 32, 32), arch=arch).eval()
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert not [m for m in net.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]


def test_pretrained_weights_from_a_local_file(tmp_path):
    source = models.mobilenet_v3_small(weights=None)  # stands in for downloaded weights (1000-class head)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    net = TorchvisionBackbone(
        num_classes=3, arch="mobilenet_v3_small", pretrained_weights=str(tmp_path / "weights.pth")
    )
    loaded = net.backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("classifier.3."):  # the old head is replaced
            torch.testing.assert_close(loaded[key], value)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit mobilenet_v3_small"):
        TorchvisionBackbone(arch="mobilenet_v3_small", pretrained_weights=str(tmp_path / "other.pth"))


def test_named_weights_offline_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"need a download from https://\S+resnet18\S+\.pth.*local path") as info:
        TorchvisionBackbone(arch="resnet18", pretrained_weights="IMAGENET1K_V1")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="neither a file nor torchvision weights"):
        TorchvisionBackbone(arch="resnet18", pretrained_weights="missing.pth")


class RecordTrainable(Callback):
    """Per epoch: does the backbone train, and how many parameters and which learning rates the optimizer has."""

    def __init__(self):
        self.epochs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            optimizer = trainer.optimizers[0]
            self.epochs.append({
                "backbone_trains": all(p.requires_grad for p in pl_module.backbone.parameters()),
                "optimized_ids": {id(p) for g in optimizer.param_groups for p in g["params"]},
                "lrs": [g["lr"] for g in optimizer.param_groups],
            })  # fmt: skip


def test_backbone_finetuning_freezes_then_unfreezes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    source = models.mobilenet_v3_small(weights=None)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    cli = cli_main([
        f"--config={CONFIGS / 'folder.yaml'}", f"--config={CONFIGS / 'finetune' / 'resnet18.yaml'}",
        f"--data.init_args.data_dir={root}", "--data.init_args.image_size=32", "--data.init_args.batch_size=8",
        "--data.init_args.test_split=0.0", "--data.init_args.augment=none",
        "--model.init_args.net.init_args.arch=mobilenet_v3_small",
        f"--model.init_args.net.init_args.pretrained_weights={tmp_path / 'weights.pth'}",
        "--trainer.callbacks.init_args.unfreeze_backbone_at_epoch=1", "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false", "--test_after_fit=false",
    ], run=False)  # fmt: skip
    probe = RecordTrainable()
    cli.trainer.callbacks.append(probe)
    frozen = {k: v.clone() for k, v in cli.model.backbone.state_dict().items() if "running" not in k}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # Lightning keeps batch-norm layers training while the rest of the backbone is frozen (train_bn: true)
    norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    convs = {id(p) for m in cli.model.backbone.modules() if not isinstance(m, norms) for p in m.parameters(False)}
    first, second = probe.epochs
    assert not first["backbone_trains"] and convs and not convs & first["optimized_ids"]
    assert second["backbone_trains"] and convs <= second["optimized_ids"]
    assert {id(p) for p in cli.model.net.head.parameters()} <= first["optimized_ids"]
    assert len(second["lrs"]) == len(first["lrs"]) + 1 and second["lrs"][-1] == pytest.approx(second["lrs"][0] * 0.1)
    changed = [k for k, v in cli.model.backbone.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])]
    assert changed, "the backbone trains once unfrozen"
