from collections.abc import Sequence

from torch import Tensor, nn

from project.models.nets.init import init_weights


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (width, 2x, 4x channels), max-pooling between them, global max-pool, linear head.

    Sized for 28x28 grayscale images (about 0.1M parameters); any input size works because of the global pooling.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        width: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(input_shape[0], width),
            nn.MaxPool2d(2),
            conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            conv_bn(2 * width, 4 * width),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
