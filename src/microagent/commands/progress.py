"""Progress on stderr: a live view on a terminal, plain lines elsewhere (``--progress``).

The library reports long work as :class:`microagent.progress.ProgressEvent` through its
``say`` callback; this module is that callback. On a terminal (``--progress=tty``, or ``auto``
with stderr a terminal outside CI) :class:`LiveReporter` draws one row per task in the style of
``docker buildx`` -- a pull's and a conversion's bytes, rate and elapsed time, a setup step's
elapsed time with its last output lines under it -- redrawn in place by ``rich`` (it measures the
terminal, cuts and redraws; no escape codes are written here). A task's notes (the library's
"flattened ... in 1.2s" while it converts) go into its row, after what the task is. The view
ends whenever every task in it has: its rows stay on the screen, and what comes next (a line,
the next batch of rows, the command's outcome) goes below them, so nothing else ever writes
into a view being redrawn.
Elsewhere :class:`PlainReporter` prints the same facts as lines: each task's start and end (size,
rate, elapsed) and, for a long download or conversion, a line every :data:`PLAIN_EVERY` seconds.

``rich`` is imported on the first event a live view draws, never by a command that reports
nothing (``plan --offline`` stays fast).
"""

from __future__ import annotations

import codecs
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

from microagent.progress import Phase, ProgressEvent, TaskKind

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.progress import Progress, Task, TaskID

PLAIN_EVERY = 5.0  # seconds between two plain lines of one download in progress
TAIL_LINES = 6  # a running setup step's last output lines shown under it
TAIL_WIDTH = 400  # characters kept of one output line


class ProgressMode(Enum):
    AUTO = "auto"
    TTY = "tty"
    PLAIN = "plain"

    def live(self, *, isatty: bool, environ: Mapping[str, str]) -> bool:
        """Whether to draw the live view: ``tty`` always, ``auto`` on a terminal that is
        not a CI job's (``CI`` set) or a dumb one."""
        if self is not ProgressMode.AUTO:
            return self is ProgressMode.TTY
        ci = environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        return isatty and not ci and environ.get("TERM") != "dumb"


class PlainReporter:
    """Lines: a task's start and end as the library words them; a download in progress
    every :data:`PLAIN_EVERY` seconds (bytes of total, rate, elapsed)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._shown: dict[str, float] = {}

    def __call__(self, message: str) -> None:
        with self._lock:
            self._write(message)

    def event(self, event: ProgressEvent) -> None:
        if event.phase is Phase.ADVANCE:
            now = time.monotonic()
            if now - self._shown.setdefault(event.task, now) < PLAIN_EVERY:
                return
            self._shown[event.task] = now
            speed = human(event.done / max(event.elapsed, 1e-3))
            what = f"{event.kind.value} {event.label}"
            self(f"  {what}  {_bytes_of(event)}  {speed}/s  {event.elapsed:.1f}s")
        elif event.line:
            self(event.line)

    def close(self) -> None:
        return None


def _bytes_of(event: ProgressEvent) -> str:
    if event.total is None:
        return human(event.done)
    return f"{human(event.done)} / {human(event.total)}"


class _Tail:
    """The last lines a guest wrote, from its raw bytes (a CR starts the line over, as on
    a terminal; what the guest wrote is made safe to show by ``clean``)."""

    def __init__(self, clean: Callable[[str], str], lines: int = TAIL_LINES) -> None:
        self._clean = clean
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.lines: deque[str] = deque(maxlen=lines)
        self.partial = ""

    def feed(self, data: bytes) -> None:
        text = self.partial + self._decoder.decode(data)
        *done, self.partial = text.split("\n")
        for line in done:
            self.lines.append(self._shown(line))
        self.partial = self.partial[-TAIL_WIDTH * 4 :]

    def _shown(self, line: str) -> str:
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
        return self._clean(line.expandtabs())[:TAIL_WIDTH]

    def view(self) -> list[str]:
        current = self._shown(self.partial) if self.partial else ""
        return [*self.lines, current] if current.strip() else list(self.lines)

    def clear(self) -> None:
        self.lines.clear()
        self.partial = ""


class LiveReporter:
    """The live view (see the module docstring) on ``console`` (made on first use: stderr,
    a terminal, or forced to be one with ``force``)."""

    def __init__(
        self,
        clean: Callable[[str], str],
        write: Callable[[str], None] = print,
        *,
        console: Console | None = None,
        force: bool = False,
        tail_lines: int = TAIL_LINES,
    ) -> None:
        self._clean, self._write = clean, write
        self._console = console
        self._force = force
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._tail = _Tail(clean, tail_lines)
        self._step: str | None = None  # the setup step whose output the tail shows

    # -- the say channel ----------------------------------------------------------------

    def __call__(self, message: str) -> None:
        """A line of text: printed above the live rows, or as a line when none are shown."""
        from rich.text import Text  # deferred: rich only once something is shown

        with self._lock:
            if self._live is None:
                self._write(message)
            else:
                self._live.console.print(Text(self._clean(message)), soft_wrap=True)

    def event(self, event: ProgressEvent) -> None:
        with self._lock:
            _live, progress = self._started()
            task = self._tasks.get(event.task)
            if task is None:
                task = self._add(progress, event)
            if event.phase is Phase.ADVANCE or event.phase is Phase.START:
                progress.update(task, **_figures(event))
                return
            if event.phase is Phase.NOTE:
                self._note(progress, task, event.line)
                return
            self._end(progress, task, event)
            if all(t.finished for t in progress.tasks):
                self.close()  # its rows stay on the screen; anything printed next goes below

    def output(self, data: bytes) -> None:
        """A setup step's live output: the last lines, under the step's row."""
        with self._lock:
            self._tail.feed(data)
            if self._live is not None:
                self._live.refresh()

    def ending_before(self, sink: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``sink``, which first ends the live view (a one-shot run's stdout after its pull)."""

        def write(data: bytes) -> None:
            self.close()
            sink(data)

        return write

    def close(self) -> None:
        """Stop drawing; a task that never ended (the command failed) is marked ERROR."""
        with self._lock:
            if self._live is None or self._progress is None:
                return
            for task in self._progress.tasks:
                if not task.finished:
                    self._progress.update(task.id, status="ERROR")
                    self._progress.stop_task(task.id)
            self._step = None
            self._live.stop()
            self._live = self._progress = None
            self._tasks.clear()

    # -- rich ---------------------------------------------------------------------------

    def _add(self, progress: Progress, event: ProgressEvent) -> TaskID:
        prefix = "" if event.kind is TaskKind.STEP else f"{event.kind.value} "
        # rich's own total stays unknown (the spinner turns) until the task ends: a
        # conversion has read all its bytes long before its ext4 image is written
        task = progress.add_task(
            prefix + self._clean(event.label),
            total=None,
            status="",
            speed=None,
            note="",
            **_figures(event),
        )
        self._tasks[event.task] = task
        if event.kind is TaskKind.STEP:
            self._step = event.task
            self._tail.clear()
        return task

    def _note(self, progress: Progress, task: TaskID, line: str) -> None:
        """A detail of a task, in its row (after what the task is), not a line above the view."""
        notes = progress.tasks[task].fields.get("note", "")
        text = self._clean(line.strip())
        progress.update(task, note=f"{notes}; {text}" if notes else f" · {text}")

    def _end(self, progress: Progress, task: TaskID, event: ProgressEvent) -> None:
        status = "CACHED" if event.phase is Phase.CACHED else "DONE"
        figures = _figures(event) if event.phase is Phase.DONE else {}
        if figures and progress.tasks[task].fields.get("speed") is not None:
            figures.pop("speed")  # the rate while bytes moved, not over the whole task
        progress.update(task, total=1, completed=1, status=status, **figures)
        progress.stop_task(task)
        if event.task == self._step:
            self._step = None
            self._tail.clear()

    def _started(self) -> tuple[Live, Progress]:
        if self._live is None or self._progress is None:
            self._live, self._progress = _make_live(self, self._console, self._force)
            self._live.start()
        return self._live, self._progress

    def tail_view(self) -> list[str]:
        return self._tail.view() if self._step is not None else []


def _make_live(
    reporter: LiveReporter, console: Console | None, force: bool
) -> tuple[Live, Progress]:
    """The rich objects of a live view (deferred: rich is imported here, on first use)."""
    # deferred: rich costs tens of milliseconds; only a command that shows progress loads it
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import Progress, SpinnerColumn, TextColumn
    from rich.table import Column
    from rich.text import Text

    class _TailView:
        def __rich__(self) -> RenderableType:
            lines = reporter.tail_view()
            return Group(
                *(
                    Text(f"    {line}", style="dim", no_wrap=True, overflow="ellipsis")
                    for line in lines
                )
            )

    console = console or Console(stderr=True, force_terminal=True if force else None)
    progress = Progress(
        SpinnerColumn(finished_text="[green]✔"),
        TextColumn(  # what the task is: cut short (…) so the figures keep their room
            "{task.description}{task.fields[note]}",
            markup=False,
            table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=12),
        ),
        _column(_bytes_cell, 19),
        _column(_rate_cell, 10),
        _column(_elapsed_cell, 7),
        _column(_status_cell, 6),
        console=console,
        auto_refresh=False,
        expand=True,
    )
    live = Live(  # what others write meanwhile goes straight through (never held back)
        Group(progress, _TailView()),
        console=console,
        refresh_per_second=8,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    return live, progress


def _column(cell: Callable[[Task], str], width: int) -> Any:
    """A column of figures ``cell`` words: right-aligned, never wrapped or cut."""
    # deferred: as in _make_live
    from rich.progress import ProgressColumn
    from rich.table import Column
    from rich.text import Text

    class _Cell(ProgressColumn):
        def render(self, task: Task) -> Text:
            text = cell(task)
            return Text(text, style=STATUS_STYLE.get(text, ""))

    return _Cell(Column(min_width=width, no_wrap=True, justify="right"))


def human(size: float) -> str:
    """``size`` bytes in decimal units, as docker shows them (``1.05MB``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.3g}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _figures(event: ProgressEvent) -> dict[str, Any]:
    """A task's byte figures from ``event`` (none for a task not counted in bytes)."""
    if event.total is None:
        return {}
    figures: dict[str, Any] = {"size": event.total, "moved": event.done}
    if event.done and event.elapsed > 0:
        figures["speed"] = event.done / event.elapsed
    return figures


def _bytes_cell(task: Task) -> str:
    size = task.fields.get("size")
    return "" if size is None else f"{human(task.fields['moved'])} / {human(size)}"


def _rate_cell(task: Task) -> str:
    speed = task.fields.get("speed")
    return "" if speed is None else f"{human(speed)}/s"


def _elapsed_cell(task: Task) -> str:
    return f"{task.elapsed or 0.0:6.1f}s"


STATUS_STYLE = {"DONE": "green", "CACHED": "cyan", "ERROR": "bold red"}


def _status_cell(task: Task) -> str:
    return str(task.fields.get("status", ""))


def reporter_for(
    mode: ProgressMode,
    clean: Callable[[str], str],
    write: Callable[[str], None],
    *,
    isatty: bool,
    environ: Mapping[str, str] | None = None,
) -> PlainReporter | LiveReporter:
    """The reporter ``mode`` asks for on this stderr and environment."""
    if mode.live(isatty=isatty, environ=os.environ if environ is None else environ):
        return LiveReporter(clean, write, force=mode is ProgressMode.TTY)
    return PlainReporter(write)
