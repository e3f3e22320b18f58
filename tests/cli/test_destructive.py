"""Destructive commands ask on a terminal and otherwise need -y; prune refuses nonsense.

`delete`, `cache prune`, `image rm` and `kernel prune` without a terminal and without
`-y` exit 2 with a hint and change nothing (`--force` and `--json` do not count as a yes);
`cache prune` refuses limits that make no sense, lists what it removes and keeps guest kits
unless `--kits`. Workspaces come from the fake backend over the busybox stand-in layout.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.commands import confirm
from testenv.clitools import cli_json as cli


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("MICROAGENT_HOME", str(path))
    return path


@pytest.fixture
def project(busybox_project: Path, home: Path) -> Path:
    proj = busybox_project
    (proj / "microagent.yaml").write_text(
        "name: ws\nimage: oci:layout:latest\nsetup: [mkdir -p /workspace]\nentrypoint: 'true'\n"
    )
    return proj


@pytest.fixture
def created(project: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A created workspace `ws` (its base image pulled, its steps in the cache)."""
    cli(capsys, "create", "-f", str(project / "microagent.yaml"))
    return project


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: what "nothing changed" compares."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and "locks" not in p.parts
    }


def fake_kit(home: Path, name: str = "k1") -> Path:
    kit = home / "store" / "kits" / name
    kit.mkdir(parents=True)
    (kit / "kit.json").write_text("{}")
    (kit / "vmlinuz").write_bytes(b"k" * 4096)
    return kit


def old_rootfs(home: Path, name: str = "old.ext4", size: int = 8192) -> Path:
    path = home / "store" / "rootfs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\1" * size)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # long unused
    return path


# -- no terminal, no -y: exit 2, nothing changed ---------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["delete", "ws"],
        ["delete", "--force", "ws"],  # --force means "even if running", not "do not ask"
        ["cache", "prune", "--all"],
        ["cache", "prune", "--all", "--kits"],
        ["cache", "prune", "--max-size", "1K"],
        ["cache", "prune", "--older-than", "1s"],
        ["image", "rm", "oci:layout:latest"],
        ["kernel", "prune"],
    ],
)
@pytest.mark.parametrize("as_json", [False, True])  # --json does not imply yes either
def test_without_a_terminal_and_without_yes_nothing_changes(
    created: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    args: list[str], as_json: bool,
) -> None:  # fmt: skip
    monkeypatch.chdir(created)
    home = Path(os.environ["MICROAGENT_HOME"])
    fake_kit(home)
    old_rootfs(home)
    before = snapshot(home)
    capsys.readouterr()
    assert main(["--json", *args] if as_json else args) == 2
    captured = capsys.readouterr()
    if as_json:
        error = json.loads(captured.out)["error"]
        assert error["kind"] == "usage" and "pass -y" in error["hint"]
    else:
        assert "not confirmed" in captured.err and "hint: pass -y" in captured.err
    assert snapshot(home) == before
    assert cli(capsys, "list")["workspaces"][0]["name"] == "ws"


def test_the_question_is_asked_on_a_terminal(
    created: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confirm, "interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    capsys.readouterr()
    assert main(["delete", "--force", "ws"]) == 1  # answered no: aborted
    assert "delete workspace ws (killing any that runs)?" in capsys.readouterr().err
    assert cli(capsys, "list")["workspaces"][0]["name"] == "ws"
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert cli(capsys, "delete", "ws")["results"] == [{"workspace": "ws", "deleted": True}]


def test_on_a_terminal_prune_shows_what_would_go_before_asking(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old_rootfs(home)
    monkeypatch.setattr(confirm, "interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    capsys.readouterr()
    assert main(["cache", "prune", "--all"]) == 1
    err = capsys.readouterr().err
    assert "rootfs/old.ext4" in err and "remove these cache entries?" in err
    assert (home / "store" / "rootfs" / "old.ext4").exists()


def test_yes_goes_ahead(created: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "delete", "-y", "ws")["results"][0]["deleted"] is True
    assert cli(capsys, "list")["workspaces"] == []


# -- prune limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-size", "-1G"], "must be more than 0"),
        (["--max-size", "0"], "must be more than 0"),
        (["--max-size", "lots"], "not a size"),
        (["--max-size", "1x"], "not a size"),
        (["--max-size", "nan"], "not a size"),
        (["--max-size", "inf"], "not a size"),
        (["--max-size", "1e3"], "not a size"),
        (["--max-size", "9" * 40], "not a size"),
        (["--older-than", "-1d"], "must be more than 0"),
        (["--older-than", "0h"], "must be more than 0"),
        (["--older-than", "7"], "not an age"),
        (["--older-than", "soon"], "not an age"),
        (["--all", "--max-size", "1G"], "exclude each other"),
        ([], "needs a limit"),
    ],
)
def test_prune_refuses_nonsensical_limits(
    home: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    fake_kit(home)
    old_rootfs(home)
    before = snapshot(home)
    for extra in ([], ["-y"]):
        capsys.readouterr()
        assert main(["cache", "prune", *args, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "hint: " in err
    assert snapshot(home) == before


def test_prune_lists_what_it_removes_and_keeps_guest_kits(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = fake_kit(home)
    old = old_rootfs(home, size=3 * 1024 * 1024)
    capsys.readouterr()
    assert main(["cache", "prune", "--all", "-y"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("removed") and "MB" in lines[0] and "rootfs/old.ext4" in lines[0]
    assert lines[-1].startswith("removed 1 entry, freed")  # not "1 entries"
    assert not old.exists() and kit.is_dir(), "a guest kit goes only with --kits"
    # --dry-run lists, removes nothing; --kits lets the kit go
    dry = cli(capsys, "cache", "prune", "--all", "--kits", "--dry-run")
    assert dry["dryRun"] is True and [e["name"] for e in dry["removed"]] == ["kits/k1"]
    assert kit.is_dir()
    done = cli(capsys, "cache", "prune", "--all", "--kits", "-y")
    assert [(e["name"], e["kind"]) for e in done["removed"]] == [("kits/k1", "kits")]
    assert done["removed"][0]["diskBytes"] == done["freedBytes"] > 0
    assert not kit.exists()


def test_prune_never_removes_what_a_workspace_uses(
    created: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_rootfs(home)
    removed = cli(capsys, "cache", "prune", "--all", "-y")["removed"]
    assert [e["name"] for e in removed] == ["rootfs/old.ext4"]
    assert cli(capsys, "cache", "prune", "--all", "-y")["removed"] == []


def test_prune_older_than_keeps_recent_entries(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_rootfs(home, "old.ext4")
    recent = old_rootfs(home, "recent.ext4")
    recent.touch()
    removed = cli(capsys, "cache", "prune", "--older-than", "1d", "-y")["removed"]
    assert [e["name"] for e in removed] == ["rootfs/old.ext4"]
    assert recent.exists()


def test_image_rm_and_kernel_prune_with_yes(
    created: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(created)
    keys = [i["key"] for i in cli(capsys, "image", "ls")["images"]]
    cli(capsys, "delete", "-y", "ws")  # a workspace's base image is refused (its root's bottom)
    assert cli(capsys, "image", "rm", "-y", "oci:layout:latest")["removed"] == keys
    assert cli(capsys, "image", "ls")["images"] == []
    assert cli(capsys, "kernel", "prune", "-y")["removed"] == []
