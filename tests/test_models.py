"""Nets and the classifier: shapes, preprocessing, parameter groups, transfer learning."""

import warnings

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torchvision import models

from project.errors import UserError
from project.models import ImageClassifier
from project.models.nets import MLP, ResNet, SmallCNN, TorchvisionBackbone
from tests.conftest import CONFIGS, fit
from tests.formats import write_image_folder


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        (MLP(num_classes=7, input_shape=(1, 28, 28)), (1, 28, 28)),
        (SmallCNN(num_classes=7, input_shape=(3, 40, 40)), (3, 40, 40)),
        (SmallCNN(num_classes=7, input_shape=(1, 28, 28), width=4, stages=2, head="flatten", hidden=16), (1, 28, 28)),
        (SmallCNN(num_classes=7, input_shape=(3, 30, 30), width=4, stages=3, pool_first=True), (3, 30, 30)),
        (ResNet(num_classes=7, input_shape=(3, 32, 32), blocks=(1, 1), width=8), (3, 32, 32)),
        (TorchvisionBackbone(num_classes=7, input_shape=(1, 32, 32), arch="mobilenet_v3_small"), (1, 32, 32)),
        (TorchvisionBackbone(num_classes=7, input_shape=(3, 32, 32), arch="efficientnet_b0"), (3, 32, 32)),
    ],
)
def test_nets_map_images_to_logits(net, shape):
    out = net(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_small_cnn_flatten_head_keeps_where_features_are_and_resnet_blocks_start_as_identity():
    flat = SmallCNN(num_classes=2, width=4, stages=2, head="flatten").eval()
    pooled = SmallCNN(2, width=4, stages=2).eval()
    assert flat.head[-1].in_features == 8 * 7 * 7 and pooled.head[-1].in_features == 8
    left, right = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    left[..., 12:16, 4:8], right[..., 12:16, 16:20] = 1.0, 1.0  # same alignment to the pools, off the borders
    torch.testing.assert_close(pooled(left), pooled(right))
    assert not torch.allclose(flat(left), flat(right))
    block, x = ResNet(num_classes=3, blocks=(1, 1), width=8).eval().stages[0], torch.relu(torch.randn(2, 8, 8, 8))
    torch.testing.assert_close(block(x), x)


def test_small_cnn_pool_first_normalizes_pooled_maps_and_equals_the_default_in_eval():
    kwargs = {"num_classes": 3, "width": 4, "stages": 2, "head": "flatten", "hidden": 8}
    default, pool_first = SmallCNN(**kwargs), SmallCNN(**kwargs, pool_first=True)
    norm_inputs = []
    for bn in (m for m in pool_first.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.register_forward_pre_hook(lambda _, args: norm_inputs.append(tuple(args[0].shape[-2:])))
    x = torch.randn(5, 1, 28, 28)
    pool_first.train()(x)
    assert norm_inputs == [(14, 14), (7, 7)]  # BN runs after each pool, on a quarter of the pixels
    # Same weights: in eval, BN with a positive scale is an increasing map, which max-pool commutes with.
    with torch.no_grad():
        for bn in (m for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.abs_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
        for mine, theirs in zip(pool_first.state_dict().values(), default.state_dict().values(), strict=True):
            mine.copy_(theirs)
    torch.testing.assert_close(pool_first.eval()(x), default.eval()(x))


def test_classifier_normalizes_raw_images_itself():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():  # class 1 when the second pixel is brighter than the first
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        net[1].bias.zero_()
    model = ImageClassifier(net, num_classes=2, mean=[0.5], std=[0.25], channels_last=True).eval()
    images = torch.tensor([[[[0, 64], [128, 255]]], [[[200, 10], [0, 0]]]], dtype=torch.uint8)
    torch.testing.assert_close(model(images), net((images / 255 - 0.5) / 0.25))
    torch.testing.assert_close(model(images), model(images / 255))  # float input in [0, 1]
    out = model.predict_step((images, torch.zeros(2)), 0)
    torch.testing.assert_close(out["probs"], net((images / 255 - 0.5) / 0.25).softmax(-1))
    assert out["preds"].tolist() == [1, 0]


def test_parameter_groups_metrics_and_hyperparameters():
    names = list("abcdefghijk")
    model = ImageClassifier(SmallCNN(num_classes=11), num_classes=11, class_names=names, label_smoothing=0.1)
    decay, no_decay = model.parameter_groups()
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.Linear)}
    assert len(weights) == 4 and len(norms) == 6 and len(biases) == 1  # 3 conv-BN stages, one linear head
    assert [id(p) for p in decay["params"]] == [id(p) for p in model.parameters() if id(p) in weights]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in model.parameters() if id(p) in norms | biases]
    assert [g["weight_decay"] for g in model.configure_optimizers().param_groups] == [0.05, 0.0]
    assert "val/top5" in model.val_metrics.keys()  # only with more than ten classes
    assert "net" not in model.hparams and "optimizer" not in model.hparams, "no objects pickled into checkpoints"
    assert model.hparams["class_names"] == list("abcdefghijk") and model.hparams["label_smoothing"] == 0.1
    weighted = ImageClassifier(MLP(num_classes=2, input_shape=(1, 2, 2)), num_classes=2, class_weights=[1.0, 3.0])
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    expected = nn.functional.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted.criterion(logits, y), expected)


def test_compile_keeps_state_dict_keys():
    torch._dynamo.reset()
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), num_classes=2, compile={"backend": "eager"})
    keys = set(model.state_dict())
    model.setup("fit")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model(torch.rand(3, 1, 2, 2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before and set(model.state_dict()) == keys


def test_pretrained_weights_from_a_local_file_and_offline_names(tmp_path, monkeypatch):
    source = models.mobilenet_v3_small(weights=None)  # stands in for downloaded weights (1000-class head)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    net = TorchvisionBackbone(
        num_classes=3, arch="mobilenet_v3_small", pretrained_weights=str(tmp_path / "weights.pth")
    )
    loaded = net.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if not k.startswith("classifier.3."))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit mobilenet_v3_small"):
        TorchvisionBackbone(arch="mobilenet_v3_small", pretrained_weights=str(tmp_path / "other.pth"))
    offline = lambda *a, **k: (_ for _ in ()).throw(OSError)  # noqa: E731
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"need a download from https://\S+resnet18\S+\.pth.*local path"):
        TorchvisionBackbone(arch="resnet18", pretrained_weights="IMAGENET1K_V1")


class Trainable(Callback):
    """Per epoch: which backbone parameters train, and the learning rates of the optimizer's groups."""

    def __init__(self):
        self.epochs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            trains = {n for n, p in pl_module.backbone.named_parameters() if p.requires_grad}
            self.epochs.append((trains, [g["lr"] for g in trainer.optimizers[0].param_groups]))


def test_finetune_config_freezes_the_whole_backbone_then_trains_it_slower(tmp_path):
    """As the config's comment says: the backbone's weights frozen (its batch norms train), then added at 1/10 of the
    head's learning rate, doubling each epoch; no warning about parameter groups."""
    root = write_image_folder(tmp_path / "imgs", {"red": 8, "stripes": 8})
    torch.save(models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "weights.pth")
    finetune = f"--config={CONFIGS / 'finetune/resnet18.yaml'}"
    data = ["--data.init_args.image_size=32", "--data.init_args.batch_size=8", "--data.init_args.test_split=0.0"]
    weights = f"--model.init_args.net.init_args.pretrained_weights={tmp_path / 'weights.pth'}"
    net = ["--model.init_args.net.init_args.arch=mobilenet_v3_small", weights]
    trainer = ["--trainer.callbacks.init_args.unfreeze_backbone_at_epoch=1", "--trainer.max_epochs=3"]
    cli = fit("folder.yaml", root, finetune, *data, *net, *trainer, run=False)
    probe = Trainable()
    cli.trainer.callbacks.append(probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not [w for w in caught if "already exist" in str(w.message)]
    (frozen, lrs0), (trains, lrs1), (_, lrs2) = probe.epochs
    norms = [n for n, m in cli.model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    assert trains == {n for n, _ in cli.model.backbone.named_parameters()}
    assert len(lrs1) == len(lrs0) + 1 and lrs1[-1] == pytest.approx(lrs1[0] * 0.1)
    assert lrs2[-1] == pytest.approx(2 * lrs1[-1])
