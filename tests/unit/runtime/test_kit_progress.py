"""The guest kit's first download reports its packages' bytes to a live progress view."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from runtime_kit import make_mirror, mirror_of

from microagent.commands.context import sanitize_for_terminal
from microagent.commands.progress import LiveReporter
from microagent.kit import guestkit
from microagent.store.content import Store


def test_kit_packages_are_pull_rows_with_their_bytes(tmp_path: Path) -> None:
    mirror = mirror_of(make_mirror(tmp_path / "mirror", busybox=b"BUSYBOX" * 1000))
    console = Console(record=True, force_terminal=True, width=120)
    said: list[str] = []
    live = LiveReporter(sanitize_for_terminal, said.append, console=console)
    guestkit.install_kit(Store(tmp_path / "store"), mirror, arch="amd64", progress=live)
    live.close()
    shown = console.export_text()
    rows = re.findall(r"pull (\S+) +(\S+) / (\S+) +\S+/s +[\d.]+s +DONE", shown)
    assert {name for name, _done, _size in rows} >= {"busybox-static"}, shown
    assert any(name.startswith("linux-image") for name, _d, _s in rows), shown
    assert all(done == size for _name, done, size in rows)  # every byte counted
    assert any(line.startswith("downloading busybox-static") for line in said)  # as lines
