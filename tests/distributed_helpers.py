"""What the multi-process tests share, with no import beyond the standard library (a torchrun
process's sitecustomize imports it before torch)."""
from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_threads() -> int:
    """This process's live gloo worker threads (Linux names them ``pt_gloo_runloop``). None may
    outlive the process group: at the interpreter's exit, one dropping a finished collective aborts
    the process ("terminate called without an active exception")."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names.count("pt_gloo_runloop")
