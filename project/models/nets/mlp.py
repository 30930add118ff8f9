from collections.abc import Sequence

from torch import Tensor, nn

from project.models.nets.cnn import init_weights


class MLP(nn.Module):
    """Flatten, then hidden ReLU layers with dropout: the classic MNIST baseline."""

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_shape[0] * input_shape[1] * input_shape[2]
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = units
        self.layers = nn.Sequential(*layers, nn.Linear(width, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
