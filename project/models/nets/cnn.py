from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from project.models.nets.init import init_weights


def conv_bn(c_in: int, c_out: int, pool_first: bool = False) -> nn.Sequential:
    pool = [nn.MaxPool2d(2)] if pool_first else []
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(conv, *pool, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages of ``width``, 2x, 4x ... channels, each followed by a 2x2 max-pool, then a linear head.

    ``head="global_max"`` (default) max-pools the last stage globally: about 0.1M parameters at the defaults, and any
    input size works. ``head="flatten"`` keeps the last stage's spatial layout (2x2 max-pool, flatten); with
    ``stages=2, width=16, hidden=128`` it is the fast Fashion-MNIST recipe's net (about a sixth of the default's
    compute). ``hidden`` > 0 puts a ReLU layer of that width before the output layer. ``pool_first=True`` pools
    right after each convolution (conv, pool, BN, ReLU, as in Keller Jordan's airbench), so BN and ReLU run on a
    quarter of the pixels; both Fashion-MNIST recipes use it.
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
        channels, height, width_px = input_shape[0], input_shape[1], input_shape[2]
        for stage in range(stages):
            pool = stage < stages - 1 or head == "flatten"
            layers.append(conv_bn(channels, width * 2**stage, pool_first=pool and pool_first))
            channels = width * 2**stage
            if pool and not pool_first:
                layers.append(nn.MaxPool2d(2))
            if pool:
                height, width_px = height // 2, width_px // 2
        if head == "global_max":
            layers.append(nn.AdaptiveMaxPool2d(1))
            features = channels
        else:
            features = channels * height * width_px
        self.features = nn.Sequential(*layers, nn.Flatten())
        if hidden:
            self.head = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
