"""The extras (extras): export with the preprocessing inside and its README example, int8 quantization,
distillation from the main job's kind of teacher, pruning; one-line errors for bad checkpoints in every tool."""

import fcntl
import json
import os
import re
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

from extras import compress, export
from extras.distill import distillation_loss
from extras.export import load_classifier, read_metadata
from project.errors import UserError
from project.models import ImageClassifier
from tests.conftest import CONFIGS, CSV, ROOT, error_line, fails, fit, run_module

FMNIST_CLASSES = datasets.FashionMNIST.classes  # torchvision's names, which the data module gives too
README = ROOT / "README.md"
DISTILL = f"--config={CONFIGS / 'compress' / 'distill.yaml'}"


@pytest.fixture(scope="session")
def teacher(mnist_root, tmp_path_factory) -> tuple[Path, float]:
    """The main job's recipe (tensor loader, channels_last, one-cycle) with a width-8 net on the fixture data: its
    best checkpoint and the test accuracy fit reported for it. Trained once per session: under pytest-xdist the
    first worker trains it and the other reads it (``xdist_group`` does not group with pytest 9)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    folder, result = shared / "tools-teacher", shared / "tools-teacher.json"
    with open(shared / "tools-teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.is_file():
            cli = fit(
                "fashion_mnist.yaml",
                mnist_root,
                "--model.init_args.net.init_args.width=8",
                "--trainer.max_epochs=3",
                "--data.init_args.batch_size=32",
                "--test_after_fit=true",
                f"--trainer.default_root_dir={folder}",
            )
            best = cli.config_init.fit.checkpoint.best_model_path
            result.write_text(json.dumps([best, float(cli.trainer.callback_metrics["test/acc"])]))
    best, accuracy = json.loads(result.read_text())
    assert accuracy > 0.9  # chance is 0.1
    return Path(best), accuracy


def fixture_test_set(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's Fashion-MNIST test images as uint8 (N, 1, 28, 28) and labels, straight from the IDX files."""
    data = datasets.FashionMNIST(str(mnist_root), train=False)
    return data.data.numpy()[:, None], data.targets.numpy()


def test_onnx_takes_raw_uint8_images_of_any_batch_size_and_says_how_to_feed_it(teacher, mnist_root, tmp_path, capsys):
    ckpt, test_accuracy = teacher
    export.main(["--ckpt_path", str(ckpt), "--output", str(tmp_path / "model.onnx")])
    assert f"wrote {tmp_path / 'model.onnx'} (onnx: uint8 images (N, 1, 28, 28)" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no partial file left behind
    meta = read_metadata(tmp_path / "model.onnx")
    assert meta["class_names"] == FMNIST_CLASSES and meta["input_shape"] == [1, 28, 28]
    assert (meta["input_dtype"], meta["input_range"], meta["image_mode"]) == ("uint8", [0, 255], "L")
    assert "bilinear to 28x28" in meta["resize"] and ".resize((28, 28), Image.BILINEAR)" in meta["resize"]
    assert meta["mean"] == pytest.approx([0.2860]) and meta["std"] == pytest.approx([0.3530])
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    model = load_classifier(ckpt)
    for n in (1, 7):
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
        probabilities = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = model(images).softmax(-1).numpy()
        np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    # the deployed file alone, fed raw pixels, scores what fit reported for the checkpoint on the test split
    images, labels = fixture_test_set(mnist_root)
    predicted = session.run(None, {"images": images})[0].argmax(-1)
    assert (predicted == labels).mean() == pytest.approx(test_accuracy, abs=1e-6)


def test_torchscript_takes_raw_uint8_images_and_carries_the_metadata(teacher, tmp_path):
    ckpt, _ = teacher
    out = export.export(str(ckpt), format="torchscript", output=str(tmp_path / "model.pt"))
    meta = read_metadata(out)
    assert meta["class_names"] == FMNIST_CLASSES and meta["image_mode"] == "L" and meta["input_dtype"] == "uint8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; it still loads
        scripted = torch.jit.load(str(out))
    model = load_classifier(ckpt)
    for n in (3, 6):
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
        with torch.no_grad():
            torch.testing.assert_close(scripted(images), model(images).softmax(-1), atol=1e-5, rtol=0)


def test_failed_parity_or_an_existing_output_writes_nothing(teacher, tmp_path, capsys):
    ckpt, _ = teacher
    with pytest.raises(UserError, match="differs from PyTorch on a batch of 5"):
        export.export(str(ckpt), output=str(tmp_path / "bad.onnx"), atol=-1.0)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "model.onnx"
    kept.write_text("an earlier file")
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--ckpt_path", str(ckpt), "--output", str(kept)])
    assert exit_info.value.code == 2 and "exists; choose another --output or pass --overwrite true" in error_line(
        capsys.readouterr().err
    )
    assert kept.read_text() == "an earlier file"
    done = run_module("extras.export", "--ckpt_path", str(ckpt), "--output", str(kept), "--overwrite", "true")
    assert done.returncode == 0 and not done.stderr, done.stderr  # the command as a user runs it: no warning either
    assert read_metadata(kept)["class_names"] == FMNIST_CLASSES and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx"
    ]


def readme_example() -> str:
    """The code block between ``<!-- onnx-example -->`` and ``<!-- /onnx-example -->``."""
    found = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```\s*<!-- /onnx-example -->", README.read_text(), re.S)
    assert found, "no onnx-example block in README.md"
    return found.group(1)


def test_the_readme_onnxruntime_example_classifies_an_image_file(teacher, mnist_root, tmp_path):
    """The README's ~10 lines (onnxruntime, PIL, numpy; size, mode and class names read from the model's metadata)
    print the class the PyTorch model predicts for the same file, read the way the data modules read images."""
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12 and "torch" not in code.replace("onnxruntime", "")
    ckpt, _ = teacher
    model_file = export.export(str(ckpt), output=str(tmp_path / "model.onnx"))
    images, labels = fixture_test_set(mnist_root)
    model = load_classifier(ckpt)
    (tmp_path / "classify.py").write_text(code)
    for i in (0, 1):  # an RGB file of another size: the example converts and resizes as the metadata says
        Image.fromarray(images[i, 0]).convert("RGB").resize((40, 36)).save(tmp_path / f"{i}.png")
        done = subprocess.run(
            [sys.executable, "classify.py", str(model_file), f"{i}.png"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        with Image.open(tmp_path / f"{i}.png") as image:
            pixels = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.BILINEAR))
        with torch.no_grad():
            expected = int(model(torch.from_numpy(pixels.copy())[None, None]).argmax())
        assert done.stdout.split()[0] == FMNIST_CLASSES[expected].split()[0], done.stdout
        assert expected == labels[i]  # and it is the right class


def test_int8_quantization_reports_final_paths_and_never_overwrites(teacher, tmp_path, capsys):
    """The teacher (a conv net) quantized to int8: integer ops inside, a smaller file, accuracy on the run's test
    split within 3 points of fp32 (which is what fit reported); the printed paths are the final ones."""
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
    with pytest.raises(SystemExit) as exit_info:
        compress.main(["--ckpt_path", str(ckpt), "--output_dir", str(out)])
    assert exit_info.value.code == 2 and "exists and is never written into" in error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_student_learns_from_the_teacher_alone_and_its_checkpoint_stands_alone(teacher, mnist_root, tmp_path):
    """alpha=1: the labels never reach the loss, yet the student (the distill config's small net, the main job's
    data path) ends far above chance, agreeing with the teacher. The teacher is frozen, in eval mode and unchanged;
    the student's checkpoint holds the student alone, and loads and exports after the teacher file is gone."""
    own = tmp_path / "teacher.ckpt"
    own.write_bytes(teacher[0].read_bytes())
    cli = fit(
        "fashion_mnist.yaml",
        mnist_root,
        DISTILL,
        f"--model.init_args.teacher_ckpt={own}",
        "--model.init_args.alpha=1.0",
        "--trainer.max_epochs=3",
        "--data.init_args.batch_size=32",
        "--test_after_fit=true",
        run=False,
    )
    student = cli.model
    before = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    assert not any(p.requires_grad for p in student.teacher.parameters()) and not student.teacher.training
    assert {n for n, _ in student.named_parameters()} == {f"net.{n}" for n, _ in student.net.named_parameters()}
    cli.trainer.fit(student, datamodule=cli.datamodule)
    cli.trainer.test(student, datamodule=cli.datamodule, ckpt_path="best")
    assert float(cli.trainer.callback_metrics["test/acc"]) > 0.6  # chance is 0.1; no labels were used
    assert not student.teacher.training
    for k, v in student.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    images, _ = fixture_test_set(mnist_root)
    with torch.no_grad():
        x = torch.from_numpy(images)
        agreement = (student.eval()(x).argmax(-1) == student.teacher(x).argmax(-1)).float().mean()
    assert agreement > 0.6
    best = cli.trainer.checkpoint_callback.best_model_path
    saved = torch.load(best, weights_only=True)
    assert all(k.startswith("net.") for k in saved["state_dict"]) and saved["hyper_parameters"]["alpha"] == 1.0
    own.unlink()
    loaded = ImageClassifier.load_from_checkpoint(best, weights_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))
    out = export.export(best, output=str(tmp_path / "student.onnx"))
    assert read_metadata(out)["class_names"] == FMNIST_CLASSES


def test_distillation_loss_is_zero_at_the_teacher_and_its_gradient_reaches_only_the_student():
    student_logits = torch.randn(4, 3, requires_grad=True)
    teacher_logits = torch.randn(4, 3, requires_grad=True)
    assert float(distillation_loss(teacher_logits, teacher_logits, 3.0).detach()) == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(student_logits, teacher_logits.detach(), temperature=3.0)
    loss.backward()
    assert float(loss.detach()) > 0 and student_logits.grad.abs().sum() > 0 and teacher_logits.grad is None


def test_pruning_reaches_the_configured_sparsity(mnist_root):
    cli = fit(
        "fashion_mnist.yaml",
        mnist_root,
        f"--config={CONFIGS / 'compress' / 'prune.yaml'}",
        "--model.init_args.net.init_args.width=8",
        "--trainer.max_epochs=2",
        "--data.init_args.batch_size=32",
        "--test_after_fit=true",
    )
    state = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.endswith(("_orig", "_mask"))], "pruning is made permanent in checkpoints"
    prunable = [f"{n}.weight" for n, m in cli.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((state[n] == 0).sum()) for n in prunable) / sum(state[n].numel() for n in prunable)
    assert zeros == pytest.approx(1 - 0.7**2, abs=0.01)  # 30% of what is left, twice
    assert float(cli.trainer.callback_metrics["test/acc"]) > 0.3  # still a classifier (chance is 0.1)


# ---- bad checkpoints: one line and exit code 2 in every tool ------------------------------------------------


class Evil:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


BAD = {  # name -> (what the file holds, what the error line says)
    "hostile": (lambda marker: {"state_dict": {}, "hyper_parameters": {"x": Evil(marker)}}, "could run code"),
    "text": (b"these are my notes, not weights\n", "is not a readable checkpoint"),
    "random bytes": (None, "is not a readable checkpoint"),
    "not a dict": (lambda marker: [torch.zeros(2)], "not a Lightning checkpoint (no state_dict)"),
    "no state_dict": (lambda marker: {"hyper_parameters": {"net": {}}}, "not a Lightning checkpoint (no state_dict)"),
    "no net config": (lambda marker: {"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, "holds no net config"),
    "code as the net": (
        lambda marker: {
            "state_dict": {},
            "hyper_parameters": {"net": {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}},
        },
        "cannot build its net os.system",
    ),
    "missing": (..., "not found"),
}


def write_bad(kind: str, folder: Path) -> Path:
    path, (content, _) = folder / f"{kind.replace(' ', '_')}.ckpt", BAD[kind]
    if content is None or isinstance(content, bytes):
        path.write_bytes(np.random.default_rng(0).bytes(3000) if content is None else content)
    elif content is not ...:
        torch.save(content(str(folder / "pwned")), path)
    return path


@pytest.mark.parametrize("tool", ["export", "compress", "teacher"])
@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_checkpoint_is_one_line_in_every_tool(kind, tool, tmp_path, capsys, mnist_root):
    bad = write_bad(kind, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    if tool == "teacher":
        line = fails(
            [
                "fit",
                f"--config={CONFIGS / 'fashion_mnist.yaml'}",
                DISTILL,
                CSV,
                f"--data.init_args.data_dir={mnist_root}",
                f"--model.init_args.teacher_ckpt={bad}",
                "--trainer.max_epochs=1",
                "--trainer.enable_progress_bar=false",
            ],
            capsys,
        )
    else:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            {"export": export, "compress": compress}[tool].main(["--ckpt_path", str(bad)])
        assert exit_info.value.code == 2
        line = error_line(capsys.readouterr().err)
    assert BAD[kind][1] in line and str(bad) in line, line
    assert not (tmp_path / "pwned").exists()
    if (tool, kind) != ("teacher", "missing"):  # fit has made its run folder by the time a missing teacher is noticed
        assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("tool", ["export", "compress"])
def test_without_the_export_extra_a_tool_says_what_to_install(tool, teacher, tmp_path, capsys, monkeypatch):
    """`pip install -e .` alone has no onnx or onnxruntime: one line naming the extra, and nothing written."""
    for name in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails as when it is not installed
    output = {"export": ["--output", str(tmp_path / "model.onnx")], "compress": ["--output_dir", str(tmp_path / "q")]}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        {"export": export, "compress": compress}[tool].main(["--ckpt_path", str(teacher[0]), *output[tool]])
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert "onnx" in line and line.endswith(': pip install -e ".[export]" installs it'), line
    assert list(tmp_path.iterdir()) == []


def test_the_export_command_refuses_a_hostile_checkpoint_in_one_line(tmp_path):
    bad = write_bad("hostile", tmp_path)
    done = run_module("extras.export", "--ckpt_path", str(bad), cwd=tmp_path)
    assert done.returncode == 2 and "could run code" in error_line(done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name] and not done.stdout
