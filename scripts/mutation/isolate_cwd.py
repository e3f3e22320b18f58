"""pytest plugin for mutation runs (``-p isolate_cwd``): every test runs in an empty folder of
its own. A mutant that drops a ``dir_fd`` removes or writes relative to the working directory;
without this that is mutmut's own tree (a layer whiteout once emptied ``mutants/``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cwd(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
