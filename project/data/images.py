"""Image files as a person sees them: the one rule by which every path reads an image file (training, statistics,
``predict``, serving) and which an exported model's metadata states for a deployment."""

import os
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageColor, ImageOps
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

RULE = (
    "first frame; EXIF orientation applied; 16-bit images scaled by 255/65535 and float images (0 to 1) by 255; "
    "transparent pixels composited onto the background colour; then converted to the image mode and resized "
    "bilinearly to height x width"
)


def rgb(color: str) -> tuple[int, int, int]:
    """A colour name or ``#rrggbb`` as an RGB triple (PIL's ``ImageColor``)."""
    return ImageColor.getrgb(color)[:3]


def read_image(
    source: str | os.PathLike | BinaryIO,
    mode: Literal["L", "RGB"],
    size: tuple[int, int],
    background: str = "white",
) -> Tensor:
    """An image file as a uint8 (C, H, W) tensor by the ``RULE``, in ``mode``, at ``size`` (height, width). Raises
    what PIL raises for a file it cannot decode."""
    with Image.open(source) as image:  # at the first frame
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # convert("L") would clip, not scale
            scale = 255.0 if image.mode == "F" else 255 / 65535
            pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64) * scale), 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8))
        if image.has_transparency_data:  # RGBA, LA, PA, P or L/RGB with a transparent colour
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*rgb(background), 255)), rgba).convert("RGB")
        elif image.mode not in ("L", "RGB"):  # 1, P, CMYK, YCbCr, LAB, HSV
            image = image.convert("L" if image.mode == "1" else "RGB")
        return pil_to_tensor(image.convert(mode).resize(size[::-1], Image.Resampling.BILINEAR))
