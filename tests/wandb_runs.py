"""W&B offline runs read back from disk for the tests of the W&B logger: id, name, config, summary, history,
artifacts (extras/runs.py offers the same to users; the core's tests must not need extras/).

wandb 0.31 ships no Python reader for its ``.wandb`` files, so this walks the file's LevelDB-style log of 32 KiB
blocks and decodes each record with W&B's own protobuf schema.
"""

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2


def records(path: Path) -> list[Any]:
    """The protobuf records of one ``.wandb`` file, in order."""
    data, block, pos, pending, found = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            found.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return found


def finished(path: Path, wait: float) -> list[Any]:
    """The records of ``path`` once they end the run: wandb's service process writes the file on its own, after the
    run's process finished the run (seconds later on a loaded machine). Read again whenever the file grows."""
    deadline, size = time.monotonic() + wait, -1
    while time.monotonic() < deadline:
        if path.stat().st_size != size:
            size, found = path.stat().st_size, records(path)
            if any(r.WhichOneof("record_type") == "exit" for r in found):
                return found
        time.sleep(0.1)
    raise AssertionError(f"{path} has no exit record after {wait} s: the run was never finished")


def apply(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_wandb_run(path: Path, wait: float = 300.0) -> dict[str, Any]:
    """The finished W&B run in ``path`` (a run folder holding exactly one, or a ``.wandb`` file)."""
    path = Path(path)
    files = [path] if path.suffix == ".wandb" else sorted(path.glob("wandb/*run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one W&B run in {path}, found {len(files)}"
    run: dict[str, Any] = {"dir": files[0].parent, "config": {}, "summary": {}, "history": [], "artifacts": []}
    for record in finished(files[0], wait):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"id": record.run.run_id, "name": record.run.display_name}
        elif kind in ("config", "summary"):
            for item in getattr(record, kind).update:
                apply(run[kind], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                apply(row, item)
            run["history"].append(row)
        elif kind == "artifact":
            a = record.artifact
            run["artifacts"].append(
                {
                    "type": a.type,
                    "aliases": set(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": {c.path for c in a.manifest.contents},
                }
            )
    return run
