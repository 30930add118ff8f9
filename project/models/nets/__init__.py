"""Plain ``nn.Module`` nets. Each takes ``num_classes`` and ``input_shape`` (C, H, W), linked from the data."""

from project.models.nets.backbone import TorchvisionBackbone
from project.models.nets.cnn import SmallCNN
from project.models.nets.mlp import MLP
from project.models.nets.resnet import ResNet

__all__ = ["MLP", "ResNet", "SmallCNN", "TorchvisionBackbone"]
