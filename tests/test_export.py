"""Export to TorchScript and ONNX from a checkpoint: parity, dynamic batch size, class names, safe loading."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from project.cli import cli_main
from project.errors import UserError
from project.export import export, load_net, main
from tests.conftest import CONFIGS, fast_args


@pytest.fixture(scope="module")
def checkpoint(mnist_root, tmp_path_factory) -> Path:
    """A briefly trained conv net with batch norm (Fashion-MNIST config, fixture data)."""
    folder = tmp_path_factory.mktemp("export")
    cli = cli_main(["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", *fast_args(mnist_root),
                    "--model.init_args.net.init_args.width=4", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=3", f"--trainer.default_root_dir={folder}",
                    f"--trainer.logger.init_args.save_dir={folder}"])  # fmt: skip
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def test_onnx_export_matches_pytorch_with_any_batch_size(checkpoint, tmp_path):
    out = export(str(checkpoint), format="onnx", output=str(tmp_path / "model.onnx"))
    net, hparams = load_net(checkpoint)
    model = onnx.load(str(out))
    assert json.loads({p.key: p.value for p in model.metadata_props}["class_names"]) == list(hparams["class_names"])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = torch.randn(n, 1, 28, 28)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, net(x).numpy(), atol=1e-4, rtol=0)


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path, capsys):
    main(["--ckpt_path", str(checkpoint), "--format", "torchscript", "--output", str(tmp_path / "model.pt")])
    assert "max |logits diff|" in capsys.readouterr().out
    extra = {"class_names.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    assert len(json.loads(extra["class_names.json"])) == 10
    net, _ = load_net(checkpoint)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-4, rtol=0)


def test_failed_parity_or_existing_output_writes_nothing(checkpoint, tmp_path, capsys):
    with pytest.raises(UserError, match="differs from PyTorch"):
        export(str(checkpoint), format="onnx", output=str(tmp_path / "bad.onnx"), atol=-1.0)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "model.onnx"
    kept.write_text("an earlier file")
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", str(checkpoint), "--output", str(kept)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
    assert kept.read_text() == "an earlier file"


def test_checkpoint_is_plain_data(checkpoint):
    checkpoint_data = torch.load(checkpoint, weights_only=True)  # raises on pickled classes or modules
    assert checkpoint_data["hyper_parameters"]["net"]["class_path"] == "project.models.nets.SmallCNN"
