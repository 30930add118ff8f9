"""A torchvision classification backbone with a new head, for transfer learning."""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models

from project.errors import UserError


class TorchvisionBackbone(nn.Module):
    """``backbone`` (a ``torchvision.models`` classifier, its last linear layer removed) + a new linear ``head``;
    Lightning's ``BackboneFinetuning`` freezes and unfreezes ``backbone``.

    Args:
        num_classes: linked from the data.
        input_shape: (C, H, W), linked from the data; 1-channel images are repeated to 3 channels.
        arch: a ``torchvision.models`` name: resnet18/34/50, mobilenet_v3_small/large, efficientnet_b0, ...
        pretrained_weights: a local state dict file (head included or not), or torchvision's named weights
            (``DEFAULT``, ``IMAGENET1K_V1``) when already in torch's hub cache; None: random initialisation.
        dropout: dropout before the head.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 224, 224),
        arch: str = "resnet18",
        pretrained_weights: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if input_shape[0] not in (1, 3):
            raise UserError(f"{arch} takes 1- or 3-channel images, got input_shape {tuple(input_shape)}")
        try:
            model = models.get_model(arch, weights=None)
        except ValueError:
            raise UserError(f"unknown torchvision model {arch!r}; see torchvision.models.list_models()") from None
        # the last linear layer: resnet*'s fc; mobilenet_v3, efficientnet, convnext, ...: classifier[-1]
        head, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        if pretrained_weights:
            missing, unexpected = model.load_state_dict(self._pretrained_state(arch, pretrained_weights), strict=False)
            wrong = [k for k in missing if not k.startswith(f"{head}.")] + unexpected
            if wrong:
                raise UserError(f"{pretrained_weights} does not fit {arch}: {len(wrong)} keys differ, e.g. {wrong[0]}")
        parent, _, name = head.rpartition(".")
        setattr(model.get_submodule(parent), name, nn.Identity())
        self.channels, self.backbone = input_shape[0], model
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(last.in_features, num_classes))

    @staticmethod
    def _pretrained_state(arch: str, weights: str) -> dict[str, Tensor]:
        if Path(weights).is_file():
            return torch.load(weights, map_location="cpu", weights_only=True)
        try:
            named = models.get_weight(weights) if "." in weights else models.get_model_weights(arch)[weights]
        except (KeyError, ValueError):
            raise UserError(
                f"pretrained_weights {weights!r} is neither a file nor torchvision weights of {arch}"
            ) from None
        try:
            return named.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "no download"
            raise UserError(
                f"torchvision weights {weights} of {arch} need a download from {named.url}, which failed "
                f"({type(err).__name__}); download that file elsewhere and set pretrained_weights to its local path"
            ) from None

    def forward(self, x: Tensor) -> Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.head(self.backbone(x))
