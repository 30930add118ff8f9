"""W&B runs read back from the files wandb writes offline: config, summary, history, media, artifacts, resumes;
and what happens without credentials or without a server that answers. Sweeps: tests/test_sweep.py."""

import contextlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import wandb

from notebooks.wandb_runs import read_wandb_run
from project.cli import cli_main
from project.loggers import has_credentials, resolve_mode
from tests.conftest import CONFIGS, QUIET, ROOT, fails, run_module

FAKE_KEY = "local-" + "f4ke" * 10  # planted: must appear in no file written
SMALL = [*QUIET, "--model.init_args.net.init_args.width=4", "--data.init_args.batch_size=50"]
BRIEF = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


@pytest.fixture(autouse=True, scope="module")
def _stop_wandb_service():
    yield
    wandb.teardown()  # the wandb-core service process started by the in-process runs


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", f"--data.init_args.data_dir={root}", *SMALL, *extra]


def test_fit_then_test_offline_run_read_back(mnist_root, tmp_path, monkeypatch):
    """2 epochs + `test` from the checkpoint, logged offline; everything promised is read back from disk."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    media = ["--wandb_watch.log=all", "--wandb_watch.log_freq=2", "--wandb_media.num_samples=8"]
    logger = ["--trainer.logger.init_args.log_model=true", "--trainer.logger.init_args.tags=[smoke,cpu]"]
    logger += ["--trainer.logger.init_args.group=baseline", "--trainer.logger.init_args.notes=first try"]
    cli = cli_main(fit_args(mnist_root, "--trainer.max_epochs=2", *media, *logger, "--test_after_fit=false"))
    run_dir = Path(cli.trainer.log_dir)
    run = read_wandb_run(run_dir)
    assert run_dir == Path("runs/fashion_mnist/version_0") and run["name"] == "fashion_mnist"
    given = {"project": "image-classification", "group": "baseline", "tags": ["smoke", "cpu"], "notes": "first try"}
    assert {key: run[key] for key in given} == given
    config = run["config"]  # the full resolved config, nested, plus git state
    assert config["model"]["init_args"]["net"]["init_args"]["width"] == 4 and config["seed_everything"] == 42
    assert config["data"]["init_args"]["batch_size"] == 50 and config["trainer"]["max_epochs"] == 2
    assert config["trainer"]["logger"]["init_args"]["tags"] == ["smoke", "cpu"] and "net" not in config
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run["commit"] == head and isinstance(config["code"]["dirty"], bool)  # wandb's own record of the commit
    summary = run["summary"]
    assert summary["val/acc"] == pytest.approx(float(cli.trainer.callback_metrics["val/acc"])) and summary["epoch"] == 1
    assert summary["val/acc_best"] == pytest.approx(float(cli.config_init.fit.checkpoint.best_model_score))
    keys = {k for row in run["history"] for k in row}
    assert {"train/loss", "train/acc", "val/loss", "val/f1", "lr-AdamW/pg1"} <= keys
    assert any(k.startswith("gradients/net.") for k in keys) and any(k.startswith("parameters/net.") for k in keys)
    assert len(list((run["dir"] / "files/media/table/val").glob("predictions_*.table.json"))) == 2  # every epoch
    names = list(cli.datamodule.class_names)
    matrix = json.loads((run["dir"] / "files" / summary["val/confusion_matrix_table"]["path"]).read_text())
    assert {row[0] for row in matrix["data"]} <= set(names) and sum(r[2] for r in matrix["data"]) == 60  # all val
    table = json.loads((run["dir"] / "files" / summary["val/predictions"]["path"]).read_text())
    correct = [row[4] for row in table["data"]]
    assert len(correct) == 8 and correct == sorted(correct), "misclassified first"
    models = {alias: a for a in run["artifacts"] if a["type"] == "model" for alias in a["aliases"]}
    best = Path(cli.config_init.fit.checkpoint.best_model_path).name  # Lightning's log_model: the monitored one
    assert models["best"]["metadata"]["original_filename"] == best and models["latest"] is models["best"]
    logged = [a["metadata"]["original_filename"] for a in run["artifacts"] if a["type"] == "model"]
    assert logged == [best]  # last.ckpt stays local
    assert models["best"]["files"] == {"model.ckpt"}
    last = run_dir / "checkpoints/last.ckpt"
    tested = cli_main(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={last}"])
    test_run = read_wandb_run(Path(tested.trainer.log_dir))
    assert test_run["id"] != run["id"] and "test/confusion_matrix_table" in test_run["summary"]
    assert test_run["summary"]["test/acc"] == pytest.approx(float(tested.trainer.callback_metrics["test/acc"]))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert wandb.run is None, "each command finishes its W&B run"


def test_a_resumed_fit_continues_the_same_run(mnist_root):
    """Resumed from its last.ckpt (in a new run folder), the fit logs into the same W&B run id, steps continuing; both
    runs in one process log gradients under the same names (wandb numbers watched models: "gradients/graph_1net")."""
    watch = ["--wandb_watch.log_freq=1", "--model.scheduler=null"]
    first = cli_main(fit_args(mnist_root, "--trainer.max_epochs=1", *watch))
    config = Path(first.trainer.log_dir) / "config.yaml"
    resumed = cli_main(["fit", f"--config={config}", "--ckpt_path=last", "--trainer.max_epochs=2"])
    runs = [read_wandb_run(Path(cli.trainer.log_dir)) for cli in (first, resumed)]
    assert runs[0]["id"] == runs[1]["id"] and runs[0]["dir"] != runs[1]["dir"]
    steps = [row["trainer/global_step"] for run in runs for row in run["history"] if "val/acc" in row]
    assert len(steps) == 2 and steps[1] == steps[0] + 11  # 11 steps an epoch: the second run continues the first
    for run in runs:
        keys = {k for row in run["history"] for k in row if k.startswith("grad")}
        assert all(k.startswith("gradients/net.") for k in keys), keys
        assert any(k.startswith("gradients/net.head.") for k in keys), keys


def no_wandb_environment(home: Path) -> dict[str, str | None]:
    return {"HOME": str(home), "WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": str(home / "no-netrc")}


def sync_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in (done.stdout + done.stderr).splitlines() if "W&B run saved offline in" in line]
    return line


def test_no_credentials_no_tty_goes_offline_and_says_how_to_sync(mnist_root, tmp_path):
    args = fit_args(mnist_root, *BRIEF, "--test_after_fit=true")
    done = run_module("project", *args, cwd=tmp_path, **no_wandb_environment(tmp_path))
    run = read_wandb_run(tmp_path / "runs" / "fashion_mnist" / "version_0")
    assert sync_line(done).endswith(f"(no W&B credentials found); upload it with: wandb sync {run['dir'].resolve()}")
    assert "test/acc" in run["summary"], "test_after_fit logs into the same run"


def serve_slowly(server: socket.socket, delay: float, requests: list[str]) -> None:
    """Answer each GET on ``server`` (the reachability check) with HTTP 200 only ``delay`` seconds later, anything
    else (wandb's telemetry) at once with 404; keep each request line in ``requests``."""

    def answer(connection: socket.socket) -> None:
        with contextlib.suppress(OSError), connection:
            request = connection.recv(65536).decode(errors="replace").split("\r\n")[0]
            requests.append(request)
            if request.startswith("GET"):
                time.sleep(delay)
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            else:
                connection.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    with contextlib.suppress(OSError):  # until the server is closed
        while True:
            threading.Thread(target=answer, args=(server.accept()[0],), daemon=True).start()


def test_a_server_slower_than_the_timeout_sends_the_run_offline(mnist_root, tmp_path):
    """A key, and a W&B server (loopback) that answers only after 4 s while the logger's timeout is 1 s (the
    default is 5): the run goes offline after one check, says why, and `wandb sync` can upload it later. A check
    that waited longer, or had no timeout, would get the answer and go online."""
    server, requests = socket.create_server(("127.0.0.1", 0)), []
    threading.Thread(target=serve_slowly, args=(server, 4.0, requests), daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {**no_wandb_environment(tmp_path), "WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": url}
    args = fit_args(mnist_root, *BRIEF, "--trainer.logger.init_args.timeout=1")
    done = run_module("project", *args, cwd=tmp_path, timeout=100, **env)
    server.close()
    line = sync_line(done)
    assert f"({url} did not answer: timed out)" in line and "credentials found" not in line
    assert [r for r in requests if r.startswith("GET")] == ["GET / HTTP/1.1"], requests
    assert read_wandb_run(tmp_path / "runs" / "fashion_mnist" / "version_0")["id"]


def test_mode_follows_the_logger_then_the_environment_then_credentials(tmp_path, monkeypatch, capsys, mnist_root):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE")
    assert not has_credentials() and resolve_mode()[0] == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert has_credentials() and resolve_mode() == ("online", "credentials found")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode()[0] == "offline" and resolve_mode("disabled")[0] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "bogus")
    assert "W&B mode 'bogus'" in fails(fit_args(mnist_root), capsys)


def test_disabled_mode_trains_and_writes_no_wandb_files(mnist_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main(fit_args(mnist_root, *BRIEF, "--test_after_fit=true"))
    run_dir = Path(cli.trainer.log_dir)
    assert "test/acc" in cli.trainer.callback_metrics and (run_dir / "checkpoints" / "last.ckpt").is_file()
    written = [p for p in Path.cwd().rglob("*") if "wandb" in p.name or p.name.startswith("run-")]
    assert written == [], "wandb wrote nothing, anywhere (run folder, ./wandb, WANDB_*_DIR)"
