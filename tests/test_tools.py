"""The extras: export with the preprocessing inside and its README example, int8 quantization, distillation,
pruning; one-line errors for bad checkpoints in every tool."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import datasets

from extras import compress, export, load_trained, serve
from extras.distill import distillation_loss
from extras.export import read_metadata
from project.data.images import RULE, read_image
from project.errors import UserError
from project.models import ImageClassifier
from tests.conftest import CONFIGS, CSV, ROOT, fails, fit, run_module
from tests.test_readme import shown_files

FMNIST_CLASSES = datasets.FashionMNIST.classes  # torchvision's names, which the data module gives too
DISTILL = f"--config={CONFIGS / 'compress' / 'distill.yaml'}"
WIDTH_8, SMALL = "--model.init_args.net.init_args.width=8", ["--data.init_args.batch_size=32", "--test_after_fit=true"]


@pytest.fixture(scope="module")
def teacher(mnist_root, tmp_path_factory) -> tuple[Path, float]:
    """The main job's recipe with a width-8 net on the fixture data: its best checkpoint and fit's test accuracy."""
    folder = f"--trainer.default_root_dir={tmp_path_factory.mktemp('teacher')}"
    cli = fit("fashion_mnist.yaml", mnist_root, WIDTH_8, *SMALL, "--trainer.max_epochs=3", folder)
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    assert accuracy > 0.9  # chance is 0.1
    return Path(cli.config_init.fit.checkpoint.best_model_path), accuracy


def fixture_test_set(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's Fashion-MNIST test images as uint8 (N, 1, 28, 28) and labels, straight from the IDX files."""
    data = datasets.FashionMNIST(str(mnist_root), train=False)
    return data.data.numpy()[:, None], data.targets.numpy()


@pytest.fixture(scope="module")
def exports(teacher, tmp_path_factory) -> dict:
    """The teacher exported in each format: onnx by the command a user runs, over an earlier file; pt2 in-process."""
    onnx = tmp_path_factory.mktemp("exports") / "model.onnx"
    onnx.write_text("an earlier file")
    done = run_module("extras.export", "--ckpt_path", str(teacher[0]), "--output", str(onnx), "--overwrite", "true")
    pt2 = export.export(str(teacher[0]), "pt2", str(onnx.with_suffix(".pt2")))
    return {"onnx": onnx, "pt2": pt2, "command": done}


def test_exports_take_raw_uint8_images_of_any_batch_size_and_say_how_to_feed_them(teacher, exports, mnist_root):
    ckpt, test_accuracy = teacher
    done = exports["command"]
    assert done.returncode == 0 and not done.stderr, done.stderr  # no warning either
    wrote = f"wrote {exports['onnx']} (onnx: uint8 images (N, 1, 28, 28) -> probabilities of 10 classes"
    assert done.stdout.startswith(wrote), done.stdout
    assert sorted(p.name for p in exports["onnx"].parent.iterdir()) == ["model.onnx", "model.pt2"]  # nothing partial
    meta = read_metadata(exports["onnx"])
    assert read_metadata(exports["pt2"]) == meta
    keys = ("class_names", "input_shape", "input_dtype", "input_range", "image_mode", "background")
    assert [meta[k] for k in keys] == [FMNIST_CLASSES, [1, 28, 28], "uint8", [0, 255], "L", "white"]
    assert meta["image_rule"].startswith(RULE)
    assert meta["image_rule"].endswith("background white, image mode L, 28x28 (height x width)")
    assert meta["mean"] == pytest.approx([0.2860]) and meta["std"] == pytest.approx([0.3530])
    session = onnxruntime.InferenceSession(str(exports["onnx"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    program, model = torch.export.load(exports["pt2"]).module(), load_trained(ckpt, "test")
    for n in (1, 7):
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
        probabilities = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = model(images).softmax(-1)
            torch.testing.assert_close(program(images), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    # the deployed file alone, fed raw pixels, scores what fit reported for the checkpoint on the test split
    images, labels = fixture_test_set(mnist_root)
    predicted = session.run(None, {"images": images})[0].argmax(-1)
    assert (predicted == labels).mean() == pytest.approx(test_accuracy, abs=1e-6)


def test_failed_parity_or_an_existing_output_writes_nothing(teacher, tmp_path, capsys):
    with pytest.raises(UserError, match="differs from PyTorch on a batch of 5"):
        export.export(str(teacher[0]), format="pt2", output=str(tmp_path / "bad.pt2"), atol=-1.0)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "model.onnx"
    kept.write_text("an earlier file")
    line = fails(["--ckpt_path", str(teacher[0]), "--output", str(kept)], capsys, main=export.main)
    assert "exists; choose another --output or pass --overwrite true" in line and kept.read_text() == "an earlier file"


def readme_example() -> str:
    """The code block between ``<!-- onnx-example -->`` and ``<!-- /onnx-example -->``."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```\s*<!-- /onnx-example -->", readme, re.S)
    assert found, "no onnx-example block in README.md"
    return found.group(1)


def files_as_people_have_them(images: np.ndarray, folder: Path) -> list[Path]:
    """Test images as a user's files: RGB at another size, transparency over noise, EXIF-rotated, 16-bit."""
    rng = np.random.default_rng(0)
    Image.fromarray(images[0, 0]).convert("RGB").resize((40, 36)).save(folder / "0.png")
    rgba = np.dstack([rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), np.full((28, 28), 255, np.uint8)])
    rgba[..., 3][images[1, 0] < 40] = 0  # the dark background transparent, noise underneath
    rgba[..., :3][images[1, 0] >= 40] = images[1, 0][images[1, 0] >= 40, None]
    Image.fromarray(rgba).save(folder / "1.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 270 degrees (clockwise 90) to show it upright
    Image.fromarray(images[2, 0]).transpose(Image.Transpose.ROTATE_90).save(folder / "2.jpg", exif=exif, quality=95)
    Image.fromarray(images[3, 0].astype(np.uint16) * 257).save(folder / "3.png")  # mode I;16
    return [folder / name for name in ("0.png", "1.png", "2.jpg", "3.png")]


STANDALONE = """
import runpy, sys
sys.modules.update(project=None, extras=None, tests=None)  # importing any of them now fails
import json, numpy as np, onnxruntime, torch
images, extra = np.load("images.npy"), {"metadata.json": ""}
with torch.no_grad():
    np.save("pt2.npy", torch.export.load("model.pt2", extra_files=extra).module()(torch.from_numpy(images)).numpy())
session = onnxruntime.InferenceSession("model.onnx")
np.save("onnx.npy", session.run(None, {"images": images})[0])
names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
print(json.loads(extra["metadata.json"])["image_mode"], names[9])
for path in sys.argv[1:]:  # the README's example on each file
    sys.argv = ["classify.py", "model.onnx", path]
    runpy.run_path("classify.py")
"""


def test_exports_and_the_readme_example_run_in_a_process_that_cannot_import_this_project(
    teacher, exports, mnist_root, tmp_path
):
    """The README's lines (onnxruntime, PIL, numpy) print what the PyTorch model gives for the file as
    project.data.images reads it, where a plain ``Image.open(f).convert(mode)`` would read other pixels."""
    code = readme_example()
    assert len(code.strip().splitlines()) <= 16 and "torch" not in code.replace("onnxruntime", "")
    (tmp_path / "classify.py").write_text(code)
    for format in ("onnx", "pt2"):
        shutil.copy(exports[format], tmp_path)
    files = files_as_people_have_them(fixture_test_set(mnist_root)[0], tmp_path)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "images.npy", images.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", STANDALONE, *map(str, files)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    printed = done.stdout.splitlines()
    assert printed[0].split() == ["L", "Ankle", "boot"] and len(printed) == 1 + len(files), printed
    model = load_trained(teacher[0], "test")
    with torch.no_grad():
        expected = model(images).softmax(-1).numpy()
    for format in ("pt2", "onnx"):
        np.testing.assert_allclose(np.load(tmp_path / f"{format}.npy"), expected, atol=1e-5, rtol=0)

    def shown(pixels: torch.Tensor) -> str:
        with torch.no_grad():
            p = model(pixels[None]).softmax(-1)[0]
        return f"{FMNIST_CLASSES[int(p.argmax())]} {float(p.max()):.1%}"

    for path, line in zip(files, printed[1:], strict=True):
        assert line == shown(read_image(path, "L", (28, 28))), path
        if path.name != "0.png":  # the rule changes what it sees
            with Image.open(path) as image:
                naive = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)).copy()
            assert shown(torch.from_numpy(naive)[None]) != line, path


def test_int8_quantization_reports_final_paths_and_never_overwrites(teacher, tmp_path, capsys):
    """int8 ops inside, a smaller file, test accuracy within 3 points of fp32 (what fit reported); final paths."""
    ckpt, test_accuracy = teacher
    out = tmp_path / "int8"
    compress.main(["--ckpt_path", str(ckpt), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    report = json.loads((out / "quantization.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx", "quantization.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # the partial folder is gone
    for name in ("model.onnx", "model.int8.onnx", "quantization.json"):
        assert str(out / name) in printed
    assert ".partial" not in printed and report["int8"]["path"] == str(out / "model.int8.onnx")
    assert {"ConvInteger", "MatMulInteger"} <= set(report["int8"]["int8_ops"])
    assert report["int8"]["bytes"] < 0.7 * report["fp32"]["bytes"]  # a tiny net: graph overhead weighs in
    assert report["samples"] == 200 and report["fp32"]["accuracy"] == pytest.approx(test_accuracy, abs=1e-6)
    assert report["accuracy_drop"] <= 0.03
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = fails(["--ckpt_path", str(ckpt), "--output_dir", str(out)], capsys, main=compress.main)
    assert "exists and is never written into" in line and {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_student_learns_from_the_teacher_alone_and_its_checkpoint_stands_alone(teacher, mnist_root, tmp_path):
    """alpha=1 (no labels in the loss): far above chance, agreeing with the frozen, unchanged teacher in eval mode;
    the checkpoint holds the student alone, and loads and exports without the teacher file."""
    own = tmp_path / "teacher.ckpt"
    own.write_bytes(teacher[0].read_bytes())
    args = [f"--model.init_args.teacher_ckpt={own}", "--model.init_args.alpha=1.0", "--trainer.max_epochs=3"]
    cli = fit("fashion_mnist.yaml", mnist_root, DISTILL, *args, *SMALL, run=False)
    student = cli.model
    before = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    assert not any(p.requires_grad for p in student.teacher.parameters()) and not student.teacher.training
    assert {n for n, _ in student.named_parameters()} == {f"net.{n}" for n, _ in student.net.named_parameters()}
    cli.trainer.fit(student, datamodule=cli.datamodule)
    logged = cli.trainer.callback_metrics  # its own per-step train/loss, not an empty epoch mean over it
    assert 0 < float(logged["train/acc"]) <= 1 and torch.isfinite(logged["train/loss"]) and "train/soft_loss" in logged
    cli.trainer.test(student, datamodule=cli.datamodule, ckpt_path="best")
    assert float(cli.trainer.callback_metrics["test/acc"]) > 0.6  # chance is 0.1; no labels were used
    assert not student.teacher.training
    for k, v in student.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    x = torch.from_numpy(fixture_test_set(mnist_root)[0])
    with torch.no_grad():
        agreement = (student.eval()(x).argmax(-1) == student.teacher(x).argmax(-1)).float().mean()
    assert agreement > 0.6
    best = cli.trainer.checkpoint_callback.best_model_path
    saved = torch.load(best, weights_only=True)
    assert all(k.startswith("net.") for k in saved["state_dict"]) and saved["hyper_parameters"]["alpha"] == 1.0
    own.unlink()
    loaded = ImageClassifier.load_from_checkpoint(best, weights_only=True).eval()
    out = export.export(best, "pt2", str(tmp_path / "student.pt2"))
    assert read_metadata(out)["class_names"] == FMNIST_CLASSES
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))
        torch.testing.assert_close(torch.export.load(out).module()(x), student(x).softmax(-1), atol=1e-5, rtol=0)


def test_distillation_loss_is_zero_at_the_teacher_and_its_gradient_reaches_only_the_student():
    student_logits, teacher_logits = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    assert float(distillation_loss(teacher_logits, teacher_logits, 3.0).detach()) == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(student_logits, teacher_logits.detach(), temperature=3.0)
    loss.backward()
    assert float(loss.detach()) > 0 and student_logits.grad.abs().sum() > 0 and teacher_logits.grad is None


def test_pruning_reaches_the_configured_sparsity(mnist_root):
    prune = f"--config={CONFIGS / 'compress' / 'prune.yaml'}"
    cli = fit("fashion_mnist.yaml", mnist_root, prune, WIDTH_8, *SMALL, "--trainer.max_epochs=2")
    state = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.endswith(("_orig", "_mask"))], "pruning is made permanent in checkpoints"
    prunable = [f"{n}.weight" for n, m in cli.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((state[n] == 0).sum()) for n in prunable) / sum(state[n].numel() for n in prunable)
    assert zeros == pytest.approx(1 - 0.7**2, abs=0.01)  # 30% of what is left, twice
    assert float(cli.trainer.callback_metrics["test/acc"]) > 0.3  # still a classifier (chance is 0.1)


class Evil:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def held(**hyper_parameters) -> dict:
    return {"state_dict": {}, "hyper_parameters": hyper_parameters}


CLI_WROTE = dict(_class_path="project.models.ImageClassifier", _instantiator="lightning.pytorch.cli.instantiate_module")
NOT_LIGHTNING = "not a Lightning checkpoint (no state_dict)"
BAD = {  # name -> (what the file holds: bytes, None for random bytes, ... for no file, or a function of the marker)
    "hostile": (lambda marker: held(x=Evil(marker)), "could run code"),
    "text": (b"these are my notes, not weights\n", "is not a readable checkpoint"),
    "random bytes": (None, "is not a readable checkpoint"),
    "not a dict": (lambda marker: [torch.zeros(2)], NOT_LIGHTNING),
    "no state_dict": (lambda marker: {"hyper_parameters": {"net": {}}}, NOT_LIGHTNING),
    "no model class": (lambda marker: held(lr=0.1), "names no model class"),
    "code as the model": (lambda marker: held(**{**CLI_WROTE, "_class_path": "os.system"}), "holds a os.system, not"),
    "code as the net": (
        lambda marker: held(**CLI_WROTE, net={"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}),
        "cannot build its project.models.ImageClassifier",
    ),
    "missing": (..., "not found"),
}
TOOLS = {"export": export, "compress": compress, "serve": serve}


def refusal(tool: str, ckpt: Path, mnist_root: Path, capsys: pytest.CaptureFixture) -> str:
    """The error line of an extra given ``--ckpt_path ckpt``, or of fit given it as the distillation teacher."""
    if tool in TOOLS:
        return fails(["--ckpt_path", str(ckpt)], capsys, main=TOOLS[tool].main)
    config = f"--config={CONFIGS / 'fashion_mnist.yaml'}"
    args = [config, DISTILL, CSV, f"--data.init_args.data_dir={mnist_root}", f"--model.init_args.teacher_ckpt={ckpt}"]
    return fails(["fit", *args, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"], capsys)


@pytest.mark.parametrize("tool", [*TOOLS, "teacher"])
@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_checkpoint_is_one_line_in_every_tool(kind, tool, tmp_path, capsys, mnist_root):
    """In-process ``main``: what ``python -m extras.<tool>`` runs, so this covers the commands too."""
    bad, content = tmp_path / f"{kind.replace(' ', '_')}.ckpt", BAD[kind][0]
    if content is None or isinstance(content, bytes):
        bad.write_bytes(np.random.default_rng(0).bytes(3000) if content is None else content)
    elif content is not ...:
        torch.save(content(str(tmp_path / "pwned")), bad)
    before = sorted(tmp_path.rglob("*"))
    line = refusal(tool, bad, mnist_root, capsys)
    assert BAD[kind][1] in line and str(bad) in line, line
    assert not (tmp_path / "pwned").exists()
    if (tool, kind) != ("teacher", "missing"):  # fit has made its run folder by the time a missing teacher is noticed
        assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("tool", ["export", "compress"])
def test_without_the_export_extra_a_tool_says_what_to_install(tool, teacher, tmp_path, capsys, monkeypatch):
    """`pip install -e .` alone has no onnx or onnxruntime: one line naming the extra, and nothing written."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails as when it is not installed
    output = {"export": ["--output", str(tmp_path / "model.onnx")], "compress": ["--output_dir", str(tmp_path / "q")]}
    line = fails(["--ckpt_path", str(teacher[0]), *output[tool]], capsys, main=TOOLS[tool].main)
    assert "onnx" in line and line.endswith(': pip install -e ".[export]" installs it'), line
    assert list(tmp_path.iterdir()) == []


def test_the_readme_tinynet_exports_and_compresses(mnist_root, tmp_path, monkeypatch):
    """The README's own net (``input_shape`` without a type annotation) from the user's file: fit, export, int8."""
    (tmp_path / "my_nets.py").write_text(shown_files()["my_nets.py"])
    monkeypatch.syspath_prepend(str(tmp_path))  # my_nets.py where the README puts it: the folder commands run in
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)  # imported here, forgotten after
    args = "--model.net=my_nets.TinyNet --trainer.max_epochs=1 --trainer.limit_train_batches=5 --test_after_fit=false"
    cli = fit("mnist.yaml", mnist_root, *args.split(), f"--trainer.default_root_dir={tmp_path / 'runs'}")
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    program = torch.export.load(export.export(str(ckpt), "pt2", str(tmp_path / "tiny.pt2"))).module()
    data = datasets.MNIST(str(mnist_root), train=False)
    with torch.no_grad():
        expected = cli.model.eval()(data.data[:, None]).softmax(-1)
        torch.testing.assert_close(program(data.data[:, None]), expected, atol=1e-5, rtol=0)
    report = compress.quantize(str(ckpt), output_dir=str(tmp_path / "int8"))
    accuracy = float((expected.argmax(-1) == data.targets).float().mean())
    assert report["samples"] == 200 and report["fp32"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert report["int8"]["int8_ops"]  # quantized


THEIR_TASK = '''
import torch
from lightning.pytorch import LightningModule
from torch import nn

class Denoiser(LightningModule):
    """A user's own task, not a classifier: an autoencoder that removes noise from images."""
    def __init__(self, width: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))
    def training_step(self, batch, batch_idx):
        clean = batch[0]
        return nn.functional.mse_loss(self.net(clean + 0.1 * torch.randn_like(clean)), clean)
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 1, 8, 8)), batch_size=4)
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())
'''


@pytest.fixture(scope="module")
def their_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a user's own LightningModule (in their own file), trained and saved by Lightning's CLI."""
    from lightning.pytorch.cli import LightningCLI

    folder = tmp_path_factory.mktemp("their-task")
    (folder / "their_task.py").write_text(THEIR_TASK)
    quiet = "--trainer.logger=false --trainer.enable_progress_bar=false --trainer.enable_model_summary=false".split()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        args = ["--model=their_task.Denoiser", "--trainer.max_steps=2", *quiet, f"--trainer.default_root_dir={folder}"]
        cli = LightningCLI(args=args, run=False)
        with warnings.catch_warnings():  # Lightning 2.6 measuring a list batch builds torch's deprecated LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            cli.trainer.fit(cli.model)
        cli.trainer.save_checkpoint(folder / "denoiser.ckpt")
    return folder / "denoiser.ckpt"


@pytest.mark.parametrize("tool", [*TOOLS, "teacher"])
def test_a_checkpoint_of_another_task_is_refused_in_one_line(tool, their_checkpoint, mnist_root, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(their_checkpoint.parent))  # their module importable, as where they trained it
    before = sorted(their_checkpoint.parent.rglob("*"))
    line = refusal(tool, their_checkpoint, mnist_root, capsys)
    assert f"{their_checkpoint} holds a their_task.Denoiser, not an image classifier" in line, line
    assert "needs a checkpoint of project.models.ImageClassifier" in line
    assert sorted(their_checkpoint.parent.rglob("*")) == before
