import pytest
import torch
from torch import nn

from project.models import ImageClassifier
from project.models.nets import MLP, ResNet, SmallCNN


@pytest.mark.parametrize(
    "net, shape",
    [
        (MLP(num_classes=7, input_shape=(1, 28, 28)), (1, 28, 28)),
        (SmallCNN(num_classes=7, input_shape=(1, 28, 28)), (1, 28, 28)),
        (SmallCNN(num_classes=7, input_shape=(3, 40, 40)), (3, 40, 40)),
        (SmallCNN(num_classes=7, input_shape=(1, 28, 28), width=4, stages=2, head="flatten", hidden=16), (1, 28, 28)),
        (ResNet(num_classes=7, input_shape=(3, 32, 32), blocks=(1, 1), width=8), (3, 32, 32)),
    ],
)
def test_nets_map_images_to_logits(net, shape):
    out = net(torch.randn(4, *shape))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_small_cnn_flatten_head_keeps_where_features_are():
    """head="flatten": the output layer sees each position of the last stage (7x7 after two stages on 28x28);
    the default global max-pool cannot tell a pattern's position."""
    flat = SmallCNN(num_classes=2, width=4, stages=2, head="flatten").eval()
    pooled = SmallCNN(num_classes=2, width=4, stages=2).eval()
    assert flat.head[-1].in_features == 8 * 7 * 7 and pooled.head[-1].in_features == 8
    left, right = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    left[..., 12:16, 4:8], right[..., 12:16, 16:20] = 1.0, 1.0  # same alignment to the pools, off the borders
    torch.testing.assert_close(pooled(left), pooled(right))
    assert not torch.allclose(flat(left), flat(right))


def test_resnet_blocks_start_as_identity():
    net = ResNet(num_classes=3, blocks=(1, 1), width=8).eval()
    block = net.stages[0]
    x = torch.relu(torch.randn(2, 8, 8, 8))
    torch.testing.assert_close(block(x), x)


def test_no_weight_decay_on_biases_and_norms():
    model = ImageClassifier(SmallCNN(num_classes=10), num_classes=10)
    decay, no_decay = model.parameter_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert norm_params <= {id(p) for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.05


def test_top5_only_with_more_than_ten_classes():
    assert "val/top5" not in ImageClassifier(MLP(num_classes=10), num_classes=10).val_metrics.keys()
    assert "val/top5" in ImageClassifier(MLP(num_classes=11), num_classes=11).val_metrics.keys()


def test_python_api_keeps_objects_out_of_hyperparameters():
    """A net object must not be pickled into the checkpoint (weights_only loading would refuse it)."""
    model = ImageClassifier(SmallCNN(num_classes=4), num_classes=4, class_names=list("abcd"), label_smoothing=0.1)
    assert "net" not in model.hparams and "optimizer" not in model.hparams
    assert model.hparams["class_names"] == list("abcd") and model.hparams["label_smoothing"] == 0.1


def test_predict_step_returns_classes_and_probabilities():
    model = ImageClassifier(MLP(num_classes=5), num_classes=5).eval()
    out = model.predict_step((torch.randn(6, 1, 28, 28), torch.zeros(6)), 0)
    assert out["preds"].shape == (6,) and out["probs"].shape == (6, 5)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(6))
    assert torch.equal(out["preds"], out["probs"].argmax(-1))


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    net = SmallCNN(num_classes=3)
    plain = ImageClassifier(net, num_classes=3).eval()
    x = torch.randn(2, 1, 28, 28)
    expected = plain(x)
    fast = ImageClassifier(net, num_classes=3, channels_last=True).eval()
    torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-4)
