"""Progress (issue 17 item 5): real creates and pushes against the local registry (the fake
backend boots nothing) with ``--progress=plain`` (lines), ``--progress=tty`` (rich's live view,
drawn to the captured stderr as to a terminal) and ``--json`` (stdout unchanged, nothing on
stderr); ``auto`` picks plain lines in CI and off a terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from microagent import progress as events
from microagent.cli import main
from microagent.commands import progress as rendering
from microagent.commands.progress import LiveReporter, PlainReporter, ProgressMode, reporter_for
from testenv.faultproxy import Fault, FaultProxy

SIZE = r"\d+(\.\d+)?(B|kB|MB|GB)"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    got = main(list(args))
    out, err = capsys.readouterr()
    assert got == code, out + err
    return out, err


@pytest.fixture
def spec(busybox_project: Path, busybox_image: Any) -> Path:
    """A spec on the busybox stand-in in the local registry, with two setup steps."""
    path = busybox_project / "microagent.yaml"
    path.write_text(f"name: prog\nimage: {busybox_image.ref}\nsetup:\n  - echo one\n  - echo two\n")
    return path


def test_plain_lines_say_bytes_rates_and_elapsed_time(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "ADVANCE_EVERY", 0.0)  # every chunk read is an event...
    monkeypatch.setattr(rendering, "PLAIN_EVERY", 0.0)  # ...and a line
    out, err = run(capsys, "--progress=plain", "create", "-f", str(spec))
    assert out.startswith("created prog")
    lines = err.splitlines()
    assert lines[0].startswith("pulling 127.0.0.1:")
    done = [
        line
        for line in lines
        if re.fullmatch(r"  [0-9a-f]{12} +[\d.]+ MB +\d+ MB/s  [\d.]+s", line)
    ]
    assert len(done) == 2, err  # the config and the one layer: size, rate, elapsed
    during = [
        line
        for line in lines
        if re.fullmatch(rf"  pull [0-9a-f]{{12}}  {SIZE} / {SIZE}  {SIZE}/s  [\d.]+s", line)
    ]
    assert during, err  # a download in progress: bytes of the total, rate, elapsed
    assert any(re.fullmatch(r"  flattened 1 layer\(s\) in [\d.]+s", line) for line in lines)
    for step in ("[1/2] setup echo one", "[2/2] setup echo two"):
        assert step in lines  # the step starts...
        assert "/bin/sh -eu -c " + step.split("setup ")[1] in lines  # ...its output as it comes
        assert any(re.fullmatch(re.escape(step) + r"  DONE [\d.]+s", line) for line in lines)
    assert "\x1b" not in err  # plain: no escape sequences at all

    _out, again = run(capsys, "--progress=plain", "create", "-f", str(spec), "--name", "p2")
    assert "[1/2] setup echo one  CACHED" in again.splitlines()
    assert "pulling" not in again


def test_the_live_view_shows_bytes_rates_steps_and_their_output(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    out, err = run(capsys, "--progress=tty", "create", "-f", str(spec))
    assert out.startswith("created prog")  # stdout: the outcome alone, after the view ended
    assert "\x1b[" in err  # drawn in place (rich's cursor moves), as on a terminal
    text = ANSI.sub("", err)
    frames = text.split("\r")
    pulls = [f for f in frames if re.search(rf"pull [0-9a-f]{{12}} +{SIZE} / {SIZE} +{SIZE}/s", f)]
    assert pulls, text  # a pull row: bytes of the total and the rate
    convert = r"convert 1 layer\(s\) to ext4 · flattened 1 layer\(s\) in [\d.]+s; built ext4 in"
    assert re.search(rf"{convert} [\d.]+s +{SIZE} / {SIZE} +{SIZE}/s +[\d.]+s +DONE", text), text
    assert not re.search(r"^ *(flattened|built ext4)", text, re.M)  # in the row, not above it
    assert re.search(r"\[2/2\] setup echo two +[\d.]+s +DONE", text)
    assert "    /bin/sh -eu -c echo one" in text  # the running step's output, under its row
    last = text[text.rindex("[2/2] setup echo two") :]  # the screen at the end
    assert re.fullmatch(r"\[2/2\] setup echo two +[\d.]+s +DONE\n", last), last  # folded away

    _out, again = run(capsys, "--progress=tty", "create", "-f", str(spec), "--name", "p2")
    assert re.search(r"\[1/2\] setup echo one +[\d.]+s +CACHED", ANSI.sub("", again))


def test_a_failed_step_is_marked_error_in_the_live_view(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_FAKE", json.dumps({"exitCode": 3, "stderr": "no such pkg"}))
    _out, err = run(capsys, "--progress=tty", "create", "-f", str(spec), code=1)
    text = ANSI.sub("", err)
    assert re.search(r"\[1/2\] setup echo one +[\d.]+s +ERROR", text), text
    assert "setup step failed (exit code 3)" in text  # the error, after the view ended
    assert text.index("ERROR") < text.index("setup step failed")


def test_json_output_is_unchanged_and_stderr_quiet(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, err = run(capsys, "--progress=tty", "--json", "create", "-f", str(spec))
    data = json.loads(out)
    assert data["ok"] is True and data["setupBoots"] == 2
    assert err == ""
    out2, err2 = run(capsys, "--json", "create", "-f", str(spec), "--name", "p2")
    assert set(json.loads(out2)) == set(data) and err2 == ""


def test_push_rows_say_what_was_sent(
    spec: Path, registry: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = f"{registry.host}/progress/pushed:v1"
    monkeypatch.setattr(events, "ADVANCE_EVERY", 0.0)  # every chunk sent is an event...
    monkeypatch.setattr(rendering, "PLAIN_EVERY", 0.0)  # ...and a line
    _out, err = run(capsys, "--progress=plain", "build", "-f", str(spec), "--push", target)
    pushed = [line for line in err.splitlines() if line.endswith("  pushed")]
    assert pushed and all(
        re.fullmatch(r"  [0-9a-f]{12}  [\d.]+ MB  \d+ MB/s  [\d.]+s  pushed", p) for p in pushed
    ), err
    sending = rf"  push [0-9a-f]{{12}}  {SIZE} / {SIZE}  {SIZE}/s  [\d.]+s"
    assert any(re.fullmatch(sending, line) for line in err.splitlines()), err  # while it sends
    monkeypatch.setenv("COLUMNS", "120")
    _out, err = run(capsys, "--progress=tty", "build", "-f", str(spec), "--push", target + "b")
    text = ANSI.sub("", err)
    assert re.search(r"push [0-9a-f]{12} .*CACHED", text), text  # already in the repository


def test_an_upload_that_starts_over_counts_from_zero_again(
    spec: Path,
    fault_proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry refuses the first upload (503): the retry sends the blob from its start,
    and its progress says so instead of counting the bytes twice."""
    monkeypatch.setattr(events, "ADVANCE_EVERY", 0.0)
    monkeypatch.setattr(rendering, "PLAIN_EVERY", 0.0)
    fault_proxy.inject(Fault.error(503), "/blobs/uploads/", method="PUT")
    target = f"{fault_proxy.host}/progress/retried:v1"
    _out, err = run(capsys, "--progress=plain", "build", "-f", str(spec), "--push", target)
    assert fault_proxy.injected(), "the fault was not hit"
    sending = re.compile(rf"  push ([0-9a-f]{{12}})  ({SIZE}) / ({SIZE})  {SIZE}/s  [\d.]+s")
    seen: dict[str, list[str]] = {}
    for line in err.splitlines():
        if match := sending.fullmatch(line):
            seen.setdefault(match[1], []).append(match[2])
            assert match[2] == "0B" or _bytes(match[2]) <= _bytes(match[5]), line  # never over
    assert any("0B" in done[1:] for done in seen.values()), seen  # back to 0 for the retry


def _bytes(shown: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(B|kB|MB|GB)", shown).groups()  # type: ignore[union-attr]
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_env_variable_and_auto_mode(
    spec: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_PROGRESS", "tty")
    _out, err = run(capsys, "create", "-f", str(spec))
    assert "\x1b[" in err
    monkeypatch.setenv("MICROAGENT_PROGRESS", "plain")
    _out, err = run(capsys, "--progress=auto", "create", "-f", str(spec), "--name", "p2")
    assert "\x1b" not in err and "[1/2] setup echo one  CACHED" in err  # the flag wins
    monkeypatch.setenv("MICROAGENT_PROGRESS", "fancy")
    _out, err = run(capsys, "create", "-f", str(spec), code=2)
    assert "fancy" in err and "--progress" in err


@pytest.mark.parametrize(
    ("mode", "isatty", "environ", "live"),
    [
        (ProgressMode.AUTO, True, {"TERM": "xterm"}, True),
        (ProgressMode.AUTO, True, {"TERM": "xterm", "CI": "true"}, False),
        (ProgressMode.AUTO, True, {"TERM": "xterm", "CI": "false"}, True),
        (ProgressMode.AUTO, True, {"TERM": "dumb"}, False),
        (ProgressMode.AUTO, False, {"TERM": "xterm"}, False),
        (ProgressMode.TTY, False, {"CI": "1"}, True),
        (ProgressMode.PLAIN, True, {"TERM": "xterm"}, False),
    ],
)
def test_auto_is_live_only_on_a_terminal_outside_ci(
    mode: ProgressMode, isatty: bool, environ: dict[str, str], live: bool
) -> None:
    chosen = reporter_for(mode, str, print, isatty=isatty, environ=environ)
    assert isinstance(chosen, LiveReporter if live else PlainReporter)


def test_guest_output_cannot_drive_the_terminal_from_the_tail() -> None:
    """A step's output is shown in the live view: its escape sequences are made visible."""
    from rich.console import Console

    from microagent.commands.context import sanitize_for_terminal

    console = Console(record=True, force_terminal=True, width=100)
    live = LiveReporter(sanitize_for_terminal, console=console)
    step = events.Meter(live, "k1", events.TaskKind.STEP, "[1/1] setup evil")
    live.output(b"fine\n\x1b]52;c;aGk=\x07\x1b[2Jgone\nprogress 50%\rprogress 100%\r\npart")
    assert live.tail_view() == [
        "fine",
        "\\x1b]52;c;aGk=\\x07\\x1b[2Jgone",  # visible, not acted on
        "progress 100%",  # a CR starts the line over
        "part",  # the line being written
    ]
    step.finish("")
    live.close()
    shown = console.export_text()
    assert "[1/1] setup evil" in shown and "DONE" in shown


def test_a_one_shot_run_keeps_its_stdout_apart_from_the_live_view(
    busybox_project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pull's rows are drawn and finished before the command's output is written."""
    monkeypatch.chdir(busybox_project)
    out, err = run(capsys, "--progress=tty", "run", "oci:layout:latest", "--", "echo", "hello")
    assert out == "echo hello\n"  # the fake guest echoes its command: all of it, only it
    text = ANSI.sub("", err)
    assert re.search(rf"pull [0-9a-f]{{12}} +{SIZE} / {SIZE} +{SIZE}/s +[\d.]+s +DONE", text)


def test_a_remote_cache_hit_shows_its_downloads(
    spec: Path,
    registry: Any,
    busybox_project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another machine (an empty store) takes the built steps from the cache: every blob it
    downloads is a pull row, then the hit's summary line."""
    cache = f"{registry.host}/progress/cache"
    run(capsys, "--progress=plain", "build", "-f", str(spec), "--cache-to", cache)
    monkeypatch.setenv("MICROAGENT_HOME", str(busybox_project.parent / "other"))
    monkeypatch.setenv("COLUMNS", "120")
    _out, err = run(capsys, "--progress=tty", "create", "-f", str(spec), "--cache-from", cache)
    text = ANSI.sub("", err)
    assert re.search(rf"pull [0-9a-f]{{12}} +{SIZE} / {SIZE} +{SIZE}/s +[\d.]+s +DONE", text)
    # the last step's packed rootfs image, downloaded instead of flattening: a row with bytes
    image = rf"pull rootfs image [0-9a-f]{{12}} +{SIZE} / {SIZE} +{SIZE}/s +[\d.]+s +DONE"
    assert re.search(image, text), text
    assert "REMOTE HIT" in text and "pulling" not in text  # the rows are the restore's
    assert re.search(r"\[2/2\] setup echo two +[\d.]+s +CACHED", text)  # no step ran here
