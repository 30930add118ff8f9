"""Writers of format-exact data: raw IDX (MNIST family), CIFAR pickles, image folders, files a viewer reads."""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(n: int, num_classes: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) and int labels, learnable: class k lights a 6x6 block at its place, plus noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, h, w, c), dtype=np.uint8)
    cols = max(1, (w - 6) // 6)
    for i, k in enumerate(labels):
        slot = k % (cols * cols)
        top, left = (slot // cols) * 6 % (h - 6), (slot % cols) * 6
        block = 255 if k < cols * cols else 180
        images[i, top : top + 6, left : left + 6, k % c] = block
    return images, labels


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """IDX file: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_family(folder: Path, n_train: int = 600, n_test: int = 200, compress: bool = False, seed: int = 0):
    """The four IDX files in ``folder`` (torchvision wants ``<root>/<ClassName>/raw``)."""
    for prefix, n, offset in (("train", n_train, 1), ("t10k", n_test, 0)):
        images, labels = make_images(n, 10, (1, 28, 28), seed + offset)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images[..., 0], compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)


def write_cifar(root: Path, num_classes: int, n_train: int = 500, n_test: int = 100, seed: int = 0) -> dict:
    """CIFAR-10 or CIFAR-100 pickles; their MD5s as torchvision's ``train_list``/``test_list``/``meta``, and arrays."""
    cifar100 = num_classes == 100
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if cifar100 else "labels"

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # row-major R, G, B planes
        entry = {"batch_label": name, label_key: labels.tolist(), "data": data}
        entry["filenames"] = [f"{i}.png" for i in range(len(labels))]
        if cifar100:
            entry["coarse_labels"] = (labels // 5).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    images, labels = make_images(n_train, num_classes, (3, 32, 32), seed)
    train_names = ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)]
    for name, part in zip(train_names, np.array_split(np.arange(n_train), len(train_names)), strict=True):
        dump(name, images[part], labels[part])
    test_images, test_labels = make_images(n_test, num_classes, (3, 32, 32), seed + 1)
    test_name = "test" if cifar100 else "test_batch"
    dump(test_name, test_images, test_labels)

    meta_name, meta_key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class_{i}" for i in range(num_classes)]}, f)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    return {
        "train_list": [[n, md5[n]] for n in train_names],
        "test_list": [[test_name, md5[test_name]]],
        "meta": {"filename": meta_name, "key": meta_key, "md5": md5[meta_name]},
        "train": (images, labels),
        "test": (test_images, test_labels),
    }


def draw(kind: str, rng: np.random.Generator, size: int):
    """One of three visually different kinds of picture (a blue disk, red, stripes), with random noise and placement."""
    image = rng.integers(0, 70, size=(size, size, 3), dtype=np.uint8)
    if kind == "red":
        image[..., 0] = rng.integers(150, 256, size=(size, size), dtype=np.uint8)
    elif kind == "stripes":
        image[(np.arange(size) // int(rng.integers(3, 6))) % 2 == 0] += np.uint8(150)
    else:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // int(rng.integers(4, 6))) ** 2, 2] = 255
    return Image.fromarray(image)


def write_image_folder(root: Path, counts: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` as a user would have them (sizes vary; the data module resizes). Classes are named
    after the kind drawn: ``disk``, ``red`` or ``stripes`` (any other name draws a disk)."""
    rng = np.random.default_rng(seed)
    for kind, n in counts.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw(kind, rng, size + int(rng.integers(0, 8))).save(root / kind / f"{i:03d}.png")
    return root


def write_alpha_icons(root: Path, n: int = 24, size: int = 12, seed: int = 0) -> Path:
    """Icons whose shape lives only in the alpha channel (every pixel's RGB is black), as PNG in ``root/<class>/``:
    ``disk`` (a disk) and ``bar`` (a horizontal bar), at random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for kind in ("bar", "disk"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cy, cx = rng.integers(3, size - 3, size=2)
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9 if kind == "disk" else abs(yy - cy) <= 1
            rgba = np.zeros((size, size, 4), np.uint8)
            rgba[..., 3] = np.where(shape, 255, 0)
            Image.fromarray(rgba, "RGBA").save(root / kind / f"{i:03d}.png")
    return root


def halves(left: tuple[int, ...], right: tuple[int, ...], height: int = 4, width: int = 6) -> np.ndarray:
    """(H, W, C) uint8: ``left`` colour in the left half, ``right`` in the right half."""
    image = np.empty((height, width, len(left)), np.uint8)
    image[:, : width // 2], image[:, width // 2 :] = left, right
    return image


def with_orientation(image, orientation: int) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation  # EXIF Orientation: 3 = rotated 180 degrees, 6 = rotate 90 degrees clockwise to view
    return exif.tobytes()


def write_viewer_case(case: str, folder: Path) -> tuple[int, np.ndarray]:
    """One image file in ``folder`` that plain ``convert(mode)`` reads differently from an image viewer, and what
    the viewer shows over a white background: ``(channels, (H, W, C) uint8)``."""
    folder.mkdir(parents=True, exist_ok=True)
    alpha = halves((255,), (0,))[..., 0]  # opaque left half, transparent right half
    black, white = (0, 0, 0), (255, 255, 255)
    if case in ("rgba", "la"):
        mode = "RGBA" if case == "rgba" else "LA"
        pixels = np.dstack([np.zeros((4, 6, len(mode) - 1), np.uint8), alpha])  # black, shape only in alpha
        Image.fromarray(pixels, mode).save(folder / f"{case}.png")
        return len(mode) - 1, halves(black, white)[..., : len(mode) - 1]
    if case == "palette":  # PNG palette with a tRNS chunk: index 1 (red) is transparent
        image = Image.fromarray((alpha == 0).astype(np.uint8), "P")
        image.putpalette([0, 0, 0, 255, 0, 0])
        image.save(folder / "palette.png", transparency=1)
        return 3, halves(black, white)
    if case == "gif":  # animated: frame 0 black and transparent (red), frame 1 green
        first, second = Image.fromarray((alpha == 0).astype(np.uint8), "P"), Image.new("P", (6, 4), 2)
        for frame in (first, second):
            frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        first.save(folder / "anim.gif", save_all=True, append_images=[second], transparency=1, optimize=False)
        return 3, halves(black, white)
    if case == "exif":  # a phone photo stored on its side: 16 high, 8 wide, top half white; upright 8 x 16
        stored = Image.fromarray(np.ascontiguousarray(halves((255,), (0,), 8, 16)[..., 0].T), "L")
        stored.save(folder / "phone.jpg", quality=100, exif=with_orientation(stored, 6))
        return 1, halves((0,), (255,), 8, 16)
    if case == "cmyk":  # a print-ready CMYK JPEG stored upside down: cyan | yellow, upright yellow | cyan
        stored = Image.fromarray(halves((255, 0, 0, 0), (0, 0, 255, 0), 8, 16), "CMYK")
        stored.save(folder / "print.jpg", quality=100, exif=with_orientation(stored, 3))
        return 3, halves((255, 255, 0), (0, 255, 255), 8, 16)
    if case == "png16":  # 16-bit grayscale: 0 ... 65535 across, scaled to 0 ... 255
        Image.fromarray(np.tile(np.arange(6, dtype=np.uint16) * 13107, (4, 1))).save(folder / "deep.png")
        return 1, np.tile(np.arange(6, dtype=np.uint8) * 51, (4, 1))[..., None]
    if case == "float_tiff":  # 32-bit float in [0, 1]
        Image.fromarray(np.tile(np.arange(6, dtype=np.float32) / 5, (4, 1))).save(folder / "float.tif")
        return 1, np.tile(np.arange(6, dtype=np.uint8) * 51, (4, 1))[..., None]
    raise ValueError(case)


VIEWER_CASES = ("rgba", "la", "palette", "gif", "exif", "cmyk", "png16", "float_tiff")
