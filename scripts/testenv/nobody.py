"""Run test code as the unprivileged user ``nobody``, and a directory it can use."""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

NOBODY = 65534


def as_nobody(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a forked child that dropped root for nobody; re-raise its failure."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_fd)
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        report = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and not report, report


@contextmanager
def shared_dir(prefix: str = "microagent-nobody-", mode: int = 0o777) -> Iterator[Path]:
    """A fresh directory outside pytest's root-only tmp_path that nobody can reach (``mode``
    0777: and write), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path)
