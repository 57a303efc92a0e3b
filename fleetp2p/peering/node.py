"""A node's identity: a random id kept in the data dir, so a restart is the same node."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fleetp2p.store.files import atomic_write


def load_node_id(data_dir: str | Path) -> str:
    path = Path(data_dir) / "node_id"
    try:
        node_id = path.read_text().strip()
        if node_id:
            return node_id
    except FileNotFoundError:
        pass
    node_id = f"{os.uname().nodename[:24]}-{secrets.token_hex(6)}"
    node_id = "".join(c if c.isalnum() or c in "-_." else "-" for c in node_id)
    atomic_write(path, node_id.encode())
    return node_id
