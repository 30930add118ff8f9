from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs and linears (fan-out for convs), unit-gain norms, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def conv_bn(c_in: int, c_out: int, pool_first: bool = False) -> nn.Sequential:
    pool = [nn.MaxPool2d(2)] if pool_first else []
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(conv, *pool, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages of ``width``, 2x, 4x ... channels, each followed by a 2x2 max-pool, then a linear head.

    ``head="global_max"`` max-pools the last stage globally (any input size); ``"flatten"`` 2x2 max-pools and
    flattens it. ``hidden`` > 0 puts a ReLU layer of that width before the output layer. ``pool_first`` pools right
    after each convolution (conv, pool, BN, ReLU, as in airbench), so BN and ReLU run on a quarter of the pixels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        width: int = 32,
        stages: int = 3,
        head: Literal["global_max", "flatten"] = "global_max",
        hidden: int = 0,
        dropout: float = 0.1,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, height, width_px = input_shape
        for stage in range(stages):
            pool = stage < stages - 1 or head == "flatten"
            layers.append(conv_bn(channels, width * 2**stage, pool_first=pool and pool_first))
            layers += [nn.MaxPool2d(2)] if pool and not pool_first else []
            channels = width * 2**stage
        if head == "global_max":
            layers.append(nn.AdaptiveMaxPool2d(1))
        features = channels if head == "global_max" else channels * (height >> stages) * (width_px >> stages)
        self.features = nn.Sequential(*layers, nn.Flatten())
        hidden_layers = [nn.Linear(features, hidden), nn.ReLU(inplace=True)] if hidden else []
        self.head = nn.Sequential(*hidden_layers, nn.Dropout(dropout), nn.Linear(hidden or features, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
