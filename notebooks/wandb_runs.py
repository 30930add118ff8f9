"""Runs read back from disk: the W&B offline run of a run folder (config, summary, history, artifacts).

wandb 0.31 ships no Python reader for its ``.wandb`` files (its old ``DataStore`` is gone; ``wandb sync`` is Go), so
this walks the file's LevelDB-style log of 32 KiB blocks and decodes each record with W&B's own protobuf schema.
"""

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2


def records(path: Path) -> Any:
    """The protobuf records of one ``.wandb`` file, in order."""
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
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
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def apply(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def wait_for_exit(path: Path, wait: float) -> None:
    """Return once ``path`` holds the run's exit record: wandb's service process writes the file on its own, after
    the run's process finished the run (seconds later on a loaded machine). Read again whenever the file grows."""
    deadline, size = time.monotonic() + wait, -1
    while time.monotonic() < deadline:
        if path.stat().st_size != size:
            size = path.stat().st_size
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return
        time.sleep(0.1)
    raise TimeoutError(f"{path} has no exit record after {wait} s: its run goes on, or was killed (wait=0 reads it)")


def read_wandb_run(path: Path, wait: float = 120.0) -> dict[str, Any]:
    """The W&B run in ``path`` (a run folder, or a ``.wandb`` file): id, name, project, group, tags, notes, git
    commit, config, summary, history rows in order, artifacts. A run folder must hold exactly one W&B run. Waits up
    to ``wait`` seconds for the run to be finished on disk (0: read a run in progress, or a killed one, as it is)."""
    path = Path(path)
    files = [path] if path.suffix == ".wandb" else sorted(path.glob("wandb/*run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one W&B run in {path}, found {len(files)}"
    if wait > 0:
        wait_for_exit(files[0], wait)
    run: dict[str, Any] = {"dir": files[0].parent, "config": {}, "summary": {}, "history": [], "artifacts": []}
    for record in records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run |= {"id": r.run_id, "name": r.display_name, "commit": r.git.commit, "project": r.project}
            run |= {"group": r.run_group, "tags": list(r.tags), "notes": r.notes}
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
                    "name": a.name,
                    "aliases": set(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": {c.path for c in a.manifest.contents},
                }
            )
    return run
