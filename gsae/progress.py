"""Progress of long loops, drawn on the terminal that runs the pipeline and never stored in a notebook.

``bar`` takes the part of ``tqdm``'s interface this package uses (an iterable or ``total=``, ``desc=``, ``unit=``,
``unit_scale=``, ``initial=``, ``disable=``, ``leave=``; ``update``, ``set_postfix``, ``close``) and ``stage`` names
what the process is doing. All open bars and stages of a process share one line::

    [02_train > train 03:01] SAEs 12/46 SAE (26%) 21.3 s/SAE ETA 12:04 | primary/gsae-k8-s0 246k/496k tok (50%) ...

Where it goes: inside a Jupyter kernel (papermill), ipykernel points file descriptor 2 at a pipe whose contents
become the cell's stderr output, so ``sys.__stderr__`` lands in the .ipynb as well as on the terminal. ipykernel's
``sys.stderr.fileno()`` returns its saved copy of the ORIGINAL descriptor 2, the terminal papermill was started
from, and writing there reaches that terminal only (tests/test_progress.py checks both through papermill).
A consequence: in an interactive Jupyter session the progress shows in the server's terminal, not in the notebook.

On a tty the line is redrawn in place; anywhere else (a log file, a pipe) a new line is printed every
``interval_s`` seconds. A heartbeat thread draws even when no update comes (one slow step, a step without a bar),
so the elapsed time and the ETA keep moving. Environment: ``GSAE_PROGRESS=0`` silences everything,
``GSAE_PROGRESS_INTERVAL`` sets the seconds between lines off a tty (at most 30), ``GSAE_STAGE`` names the
outermost stage (run_all.sh passes the notebook's name). Under torchrun (WORLD_SIZE > 1) each rank prints lines
labelled with its rank.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

MAX_INTERVAL_S = 30.0  # the longest silence run_all.sh promises
TTY_HEARTBEAT_S = 1.0  # on a tty the elapsed time ticks every second
RATE_WINDOW_S = 60.0  # the rate behind the ETA is measured over about the last minute, so that a burst of
#                       skipped (resumed) work stops inflating it after a minute
SAMPLE_EVERY_S = 0.5  # (time, count) samples for the rate are kept at most this often
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on", "")


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    """False silences every bar and stage (GSAE_PROGRESS=0, e.g. in tests)."""
    interval_s: float = 15.0
    """Seconds between printed lines when the terminal is not a tty (a log file, a pipe); at most 30."""
    redraw_s: float = 0.5
    """On a tty, the least time between two redraws that updates cause (drawing must not slow a fast loop)."""
    base_stage: str = ""
    """Outermost stage label, shown on every line; run_all.sh passes the notebook name as GSAE_STAGE."""
    lines_only: bool = False
    """Print new lines even on a tty: several processes share the terminal (torchrun ranks) and one line redrawn
    in place by each of them would be unreadable."""

    def __post_init__(self):
        if not 0 < self.interval_s <= MAX_INTERVAL_S:
            raise ValueError(f"progress interval_s={self.interval_s}: give seconds in (0, {MAX_INTERVAL_S:g}]")
        if self.redraw_s < 0:
            raise ValueError(f"progress redraw_s={self.redraw_s}: give seconds >= 0")

    @classmethod
    def from_env(cls, environ: Any = None) -> Settings:
        env = os.environ if environ is None else environ
        flag = env.get("GSAE_PROGRESS", "1").strip().lower()
        if flag not in _OFF + _ON:
            raise ValueError(f"GSAE_PROGRESS={flag!r}: use 1 to show progress on the terminal or 0 to silence it")
        raw = env.get("GSAE_PROGRESS_INTERVAL", str(cls.interval_s))
        try:
            interval_s = float(raw)
        except ValueError:
            raise ValueError(f"GSAE_PROGRESS_INTERVAL={raw!r}: give seconds between progress lines, e.g. 15") from None
        base_stage = env.get("GSAE_STAGE", "").strip()
        shared = int(env.get("WORLD_SIZE") or 1) > 1  # torchrun: every rank draws, so say which one
        if shared:
            base_stage = f"{base_stage} rank {env.get('RANK', '?')}".strip()
        return cls(enabled=flag not in _OFF, interval_s=interval_s, base_stage=base_stage, lines_only=shared)


def terminal_stream() -> TextIO:
    """A new text stream on the terminal this process was started from, past any notebook capture (module doc)."""
    try:
        fd = sys.stderr.fileno()  # ipykernel: its copy of the original descriptor 2; a plain process: 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both; pytest's capture raises it
        if sys.__stderr__ is None:  # no stderr at all (pythonw): nowhere to draw
            return open(os.devnull, "w")
        fd = sys.__stderr__.fileno()
    return open(os.dup(fd), "w", encoding="utf-8", errors="replace")


def _format_count(x: float, si: bool) -> str:
    if si:
        return tqdm.format_sizeof(x)
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _format_rate(per_s: float | None, unit: str) -> str:
    if not per_s:
        return f"? {unit}/s"
    return f"{tqdm.format_sizeof(per_s)} {unit}/s" if per_s >= 1 else f"{1 / per_s:.1f} s/{unit}"


class Bar:
    """One counted loop. ``n`` counts updates; with a numeric ``unit_scale`` (tqdm's meaning) the line shows
    ``n * unit_scale`` ``unit``s, e.g. training steps counted as tokens. Drawn by ``console`` (None: silent)."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool | float = False, initial: float = 0, leave: bool = True,
                 console: Console | None = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if total is not None and total < 0:
            raise ValueError(f"progress bar '{desc}': total={total} is negative; give the number of items or None")
        if not isinstance(unit_scale, bool) and not unit_scale > 0:
            raise ValueError(f"progress bar '{desc}': unit_scale={unit_scale!r}; give True/False or a factor > 0")
        self.iterable, self.total, self.desc, self.unit, self.leave = iterable, total, desc, unit, leave
        self.unit_scale = unit_scale
        self.n = initial
        self.postfix = ""
        self.console = console
        self.closed = False
        self._clock = console.clock if console is not None else time.monotonic
        self.start_time = self._clock()
        self._initial = initial
        self._samples: deque[tuple[float, float]] = deque([(self.start_time, initial)], maxlen=512)
        if console is not None:
            console.open(self)

    # --- the tqdm-like interface -------------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        self.n += n
        if self.console is None:
            return
        now = self._clock()
        with self.console.lock:
            if now - self._samples[-1][0] >= SAMPLE_EVERY_S:
                self._samples.append((now, self.n))
            self.console.refresh(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in items.items()), refresh)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if refresh and self.console is not None:
            self.console.refresh(self._clock())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""
        if refresh and self.console is not None:
            self.console.refresh(self._clock())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.console is not None:
            self.console.close(self, self.summary(self._clock()) if self.leave else None)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError(f"progress bar '{self.desc}' was made without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what is drawn ---------------------------------------------------------------------------------------------
    def rate(self, now: float) -> float | None:
        """Items per second over about the last RATE_WINDOW_S seconds, up to ``now`` (a stall lowers it)."""
        t0, n0 = self._samples[0]
        for t, n in self._samples:  # oldest first: stop at the first sample inside the window
            if t >= now - RATE_WINDOW_S:
                break
            t0, n0 = t, n
        dt = now - t0
        return (self.n - n0) / dt if dt > 0 and self.n > n0 else None

    def _scaled(self) -> tuple[float, bool]:
        return (1.0 if isinstance(self.unit_scale, bool) else float(self.unit_scale)), bool(self.unit_scale)

    def _done(self) -> str:
        scale, si = self._scaled()
        done = _format_count(self.n * scale, si)
        if self.total:
            return f"{done}/{_format_count(self.total * scale, si)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        return f"{done} {self.unit}"

    def describe(self, now: float, postfix: bool = True) -> str:
        """``desc done/total unit (pct) rate ETA remaining postfix``."""
        scale, _ = self._scaled()
        rate = self.rate(now)
        parts = [self.desc, self._done(), _format_rate(rate and rate * scale, self.unit)]
        if self.total:
            left = max(self.total - self.n, 0)
            parts.append("ETA " + (tqdm.format_interval(left / rate) if rate else ("00:00" if left == 0 else "?")))
        if postfix:
            parts.append(self.postfix)
        return " ".join(p for p in parts if p)

    def summary(self, now: float) -> str:
        """The line left behind when a ``leave=True`` bar closes: the count, the time taken, the mean rate."""
        scale, _ = self._scaled()
        took = now - self.start_time
        mean = (self.n - self._initial) / took if took > 0 else None
        return " ".join(p for p in (self.desc, self._done(), "in", tqdm.format_interval(took),
                                    f"({_format_rate(mean and mean * scale, self.unit)})", self.postfix) if p)


class Console:
    """The one progress line of a process: draws every open bar and stage on one terminal stream."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic, heartbeat: bool = True):
        self.stream = stream
        self.settings = settings or Settings()
        self.tty = (_isatty(stream) and not self.settings.lines_only) if tty is None else tty
        self.clock = clock
        self.lock = threading.RLock()
        self.bars: list[Bar] = []
        self.stages: list[tuple[str, float]] = [(self.settings.base_stage, clock())] if self.settings.base_stage else []
        self._on_screen = False  # a tty line is drawn without its newline
        self._last_draw = -math.inf
        self._broken = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = heartbeat

    # --- bookkeeping -----------------------------------------------------------------------------------------------
    def open(self, bar: Bar) -> None:
        with self.lock:
            self.bars.append(bar)
            self._start_heartbeat()
            if self.tty:
                self._draw(self.clock())

    def close(self, bar: Bar, final_line: str | None) -> None:
        with self.lock:
            if bar in self.bars:
                self.bars.remove(bar)
            if final_line is not None:
                self.print(f"{self.label(self.clock(), with_time=False)} {final_line}".lstrip())
            elif self.tty:
                self._draw(self.clock())

    def push_stage(self, name: str) -> None:
        with self.lock:
            self.stages.append((name, self.clock()))
            self._start_heartbeat()
            if self.tty:
                self._draw(self.clock())

    def pop_stage(self, failed: bool = False) -> None:
        with self.lock:
            label = self.label(self.clock(), with_time=False)
            _, t0 = self.stages.pop()
            took = tqdm.format_interval(self.clock() - t0)
            self.print(f"{label} {'failed after' if failed else 'done in'} {took}")

    # --- drawing ---------------------------------------------------------------------------------------------------
    def label(self, now: float, with_time: bool = True) -> str:
        """``[outer > inner 03:01]``: the open stages and the time spent in the innermost one."""
        if not self.stages:
            return ""
        names = " > ".join(name for name, _ in self.stages)
        return f"[{names} {tqdm.format_interval(now - self.stages[-1][1])}]" if with_time else f"[{names}]"

    def line(self, now: float, postfix: bool = True) -> str:
        bars = " | ".join(b.describe(now, postfix) for b in self.bars)
        return " ".join(p for p in (self.label(now), bars) if p)

    def refresh(self, now: float) -> None:
        """After an update: redraw a tty line at most every ``redraw_s``; off a tty, lines come from ``tick``."""
        if self.tty and now - self._last_draw >= self.settings.redraw_s:
            with self.lock:
                self._draw(now)

    def tick(self) -> None:
        """Heartbeat: draw the current line now (a new line off a tty), whether or not anything was updated."""
        with self.lock:
            if self.bars or self.stages:
                self._draw(self.clock())

    def print(self, message: str) -> None:
        """A permanent line (a finished bar or stage), above the live line on a tty."""
        with self.lock:
            self._write(("\r\x1b[K" if self._on_screen else "") + message + "\n")
            self._on_screen = False
            if self.tty and (self.bars or self.stages):
                self._draw(self.clock())

    def clear(self) -> None:
        with self.lock:
            if self._on_screen:
                self._write("\r\x1b[K")
                self._on_screen = False

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self.tty:
            width = _width(self.stream)
            if len(text) >= width:  # a wrapped line cannot be redrawn in place: drop postfixes, then cut
                text = self.line(now, postfix=False)
                text = text if len(text) < width else text[:width - 4] + "..."
            self._write("\r" + text + "\x1b[K")
            self._on_screen = True
        else:
            self._write(text + "\n")
        self._last_draw = now

    def _write(self, s: str) -> None:
        if self._broken:
            return
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):  # terminal gone (closed pipe, interpreter exit): progress must never crash work
            self._broken = True

    # --- heartbeat thread ------------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._heartbeat and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="gsae-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        period = TTY_HEARTBEAT_S if self.tty else self.settings.interval_s
        while not self._stop.wait(period):
            self.tick()

    def shutdown(self) -> None:
        """Stop the heartbeat and take a half-drawn tty line off the screen (at exit; in tests)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * TTY_HEARTBEAT_S)
        self.clear()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 120


_default: Console | None = None
_default_lock = threading.Lock()


def default_console() -> Console | None:
    """This process's console on its terminal, made on first use; None when GSAE_PROGRESS=0."""
    global _default
    settings = Settings.from_env()
    if not settings.enabled:
        return None
    with _default_lock:
        if _default is None:
            _default = Console(terminal_stream(), settings=settings)
            atexit.register(_default.shutdown)
    return _default


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        unit_scale: bool | float = False, initial: float = 0, disable: bool = False, leave: bool = True,
        console: Console | None = None) -> Bar:
    """A progress bar on the terminal (tqdm's arguments). ``unit="tok", unit_scale=tokens_per_step`` shows tok/s
    while counting steps; ``disable=True`` (or GSAE_PROGRESS=0) counts silently."""
    if not disable and console is None:
        console = default_console()
    return Bar(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, leave=leave,
               console=None if disable else console)


@contextmanager
def stage(name: str, console: Console | None = None) -> Iterator[None]:
    """Label everything drawn inside with ``name`` (nested stages read ``outer > inner``); on exit print
    ``[outer > name] done in 03:01``, so the terminal keeps each stage's wall time."""
    c = console if console is not None else default_console()
    if c is None:
        yield
        return
    c.push_stage(name)
    failed = True
    try:
        yield
        failed = False
    finally:
        c.pop_stage(failed)


def write(message: str, console: Console | None = None) -> None:
    """Print a permanent line on the terminal (above the live progress line); silent when GSAE_PROGRESS=0."""
    c = console if console is not None else default_console()
    if c is not None:
        c.print(message)
