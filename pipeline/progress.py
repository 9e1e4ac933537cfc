"""A run's progress as its user sees it: where it is, how fast, when it ends.

Rank 0 already reads the loop's statistics at every log point (`run.log_every_kimg`: the
one host sync of an interval); the host hands them on (Ray Train: the run's mailbox, read
by the driver every few seconds; train-local: directly) and `ProgressDisplay` turns them
into a `Progress` snapshot: the run (phase k of N, images shown of the total, elapsed,
ETA) and the phase (resolution, alpha, images/s, ETA, the latest d/g loss, the last SWD).
On a terminal it is a two-line live display (rich); without one (CI, a Ray Job's logs,
a pipe) one plain line per log point. Each snapshot is also written to `progress.json`
in the run folder, which `progan watch` reads. ETAs assume the current images/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from progan.files import atomic_file
from progan.schedule import Phase

PROGRESS_FILE = "progress.json"
REFRESH_S = 2.0  # how often the driver reads the mailbox and a terminal display refreshes
# a run's states in progress.json: training, evaluating (the phase end), done, stopped, failed
ENDED = ("done", "stopped", "failed")


@dataclass
class Progress:
    """One snapshot of a run's progress (what progress.json holds)."""

    run: str
    phases: int
    phase_index: int = 0
    phase: str = ""
    resolution: int = 0
    kind: str = ""
    alpha: float = 0.0
    images: int = 0  # images shown in the run so far
    phase_start: int = 0
    phase_end: int = 0
    run_end: int = 0
    images_per_s: float = 0.0
    d_loss: float | None = None
    g_loss: float | None = None
    augment_p: float | None = None  # train.augment's probability (ADA's moves; kept across phases)
    swd: float | None = None  # the last evaluation's SWDx1e3_avg
    deadline: float | None = None  # a time budget's end (wall clock): no ETA goes past it
    state: str = "starting"
    message: str = ""  # how it ended (a failure's line, a resume hint)
    started: float = field(default_factory=time.time)  # this driver's start (wall clock)
    updated: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)

    @classmethod
    def read(cls, path: Path) -> Progress:
        raw = json.loads(Path(path).read_text())
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def write(self, path: Path) -> None:
        with atomic_file(path) as f:
            f.write(json.dumps(asdict(self)).encode())

    # -- what the display shows ----------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        return max(0.0, self.updated - self.started)

    def eta_s(self, end: int) -> float | None:
        """Seconds to `end` images at the current images/s, or to the time budget's end if
        that comes first (None: not known yet)."""
        if self.images_per_s <= 0:
            return None
        eta = max(0, end - self.images) / self.images_per_s
        if self.deadline is not None:
            eta = min(eta, max(0.0, self.deadline - self.updated))
        return eta

    def run_line(self) -> str:
        pct = 100.0 * self.images / self.run_end if self.run_end else 0.0
        return (
            f"run {self.run} · phase {self.phase_index + 1}/{self.phases} · "
            f"{self.images:,}/{self.run_end:,} images ({pct:.0f}%) · "
            f"elapsed {clock(self.elapsed_s)} · ETA {clock(self.eta_s(self.run_end))}"
        )

    @property
    def phase_images(self) -> str:
        """ "done/total images" of the phase (the last batch may overrun its end)."""
        done = min(self.images, self.phase_end) - self.phase_start
        return f"{done:,}/{self.phase_end - self.phase_start:,} images"

    @property
    def losses(self) -> str:
        """The latest losses (and augmentation p), or "" before the phase's first log point."""
        if self.d_loss is None or self.g_loss is None:
            return ""
        p = "" if self.augment_p is None else f" augment_p {self.augment_p:.3f}"
        return f"d_loss {self.d_loss:.3f} g_loss {self.g_loss:.3f}{p}"

    def phase_line(self) -> str:
        parts = [
            f"{self.phase} {self.resolution}x{self.resolution} alpha {self.alpha:.2f}",
            self.phase_images,
            f"{self.images_per_s:,.0f} img/s",
            f"ETA {clock(self.eta_s(self.phase_end))}",
        ]
        if self.losses:
            parts.append(self.losses)
        if self.swd is not None:
            parts.append(f"SWD {self.swd:.1f}")
        if self.state not in ("training", "starting"):
            parts.append(self.state)
        return " · ".join(parts)

    def plain_line(self) -> str:
        """The line printed per log point without a terminal."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.updated))
        parts = [
            f"{stamp} {self.phase} ({self.phase_index + 1}/{self.phases}) alpha {self.alpha:.2f}",
            self.phase_images,
            f"{self.images_per_s:,.0f} img/s",
            f"ETA phase {clock(self.eta_s(self.phase_end))}, run {clock(self.eta_s(self.run_end))}",
        ]
        return " | ".join([*parts, self.losses] if self.losses else parts)


def clock(seconds: float | None) -> str:
    """h:mm:ss (or m:ss); '?' when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render(progress: Progress) -> Text:
    """The two-line display."""
    text = Text(progress.run_line(), style="bold")
    text.append("\n  " + progress.phase_line())
    return text


class ProgressDisplay:
    """Shows a run's progress on `console` and keeps it in `file` (progress.json).

    `point` per log point, `evaluating`/`evaluated` at a phase's end, `close` at the end.
    Live (two lines redrawn in place) when the console is a terminal, else plain lines.
    """

    def __init__(
        self,
        run: str,
        plan: Sequence[Phase],
        console: Console,
        file: Path | None = None,
        live: bool | None = None,
        budget_s: float | None = None,
    ) -> None:
        self.plan, self.console, self.file = list(plan), console, file
        end = self.plan[-1].end_images if self.plan else 0
        self.progress = Progress(run=run, phases=len(self.plan), run_end=end)
        if budget_s is not None:  # train-local --time-budget-min: ETAs end with the budget
            self.progress.deadline = self.progress.started + budget_s
        self.live_mode = console.is_terminal if live is None else live
        self._live: Any = None

    def _phase(self, index: int) -> None:
        p, phase = self.progress, self.plan[index]
        if p.phase_index != index or not p.phase:  # a new phase: nothing of its own yet
            p.images_per_s, p.d_loss, p.g_loss = 0.0, None, None
            p.phase_index, p.phase, p.kind = index, phase.name, phase.kind
            p.resolution, p.phase_start, p.phase_end = (
                phase.resolution,
                phase.start_images,
                phase.end_images,
            )
            p.images = max(p.images, phase.start_images)
            p.alpha = phase.alpha_at(min(p.images, phase.end_images))

    def phase_started(self, index: int, images: int | None = None) -> None:
        """A phase begins (or resumes at `images`)."""
        self._phase(index)
        if images is not None:
            self.progress.images = images
            self.progress.alpha = self.plan[index].alpha_at(images)
        self.progress.state = "training"
        self._show(print_line=False)

    def point(self, index: int, stats: dict[str, Any]) -> None:
        """A log point of phase `index`: the loop's stats (images_shown, alpha, losses,
        images_per_s)."""
        self._phase(index)
        p = self.progress
        p.images = int(stats.get("images_shown", p.images))
        p.alpha = float(stats.get("alpha", p.alpha))
        p.images_per_s = float(stats.get("images_per_s", p.images_per_s))
        p.d_loss = _float(stats.get("d_loss"))
        p.g_loss = _float(stats.get("g_loss"))
        p.augment_p = _float(stats.get("augment_p"))
        p.state = "training"
        self._show(print_line=True, at=_float(stats.get("time")))

    def evaluating(self, index: int) -> None:
        self._phase(index)
        self.progress.state = "evaluating"
        self._show(print_line=False)

    def evaluated(self, index: int, metrics: dict[str, float]) -> None:
        self._phase(index)
        if "SWDx1e3_avg" in metrics:
            self.progress.swd = float(metrics["SWDx1e3_avg"])
        self.progress.state = "training"
        self._show(print_line=False)

    def close_after(self, error: BaseException, hint: str = "") -> None:
        """The run ended with `error`: stopped (Ctrl-C, SIGTERM, a scheduler's exit) or
        failed; the error and `hint` (what to type next) kept in progress.json."""
        stopped = isinstance(error, KeyboardInterrupt | SystemExit)
        message = f"{type(error).__name__}: {str(error)[:300]}" + (f"; {hint}" if hint else "")
        self.close("stopped" if stopped else "failed", message)

    def close(self, state: str, message: str = "") -> None:
        """The run ended: done, stopped (Ctrl-C, a budget) or failed."""
        self.progress.state, self.progress.message = state, message
        self.progress.updated = time.time()
        self._write()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _show(self, print_line: bool, at: float | None = None) -> None:
        self.progress.updated = at or time.time()  # a point's own time (rank 0's clock)
        self._write()
        if not self.live_mode:
            if print_line:
                self.console.print(self.progress.plain_line(), highlight=False, markup=False)
                self.console.file.flush()
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(
                get_renderable=self._renderable,
                console=self.console,
                refresh_per_second=1 / REFRESH_S,
                transient=False,
            )
            self._live.start()
        self._live.refresh()

    def _renderable(self) -> Text:
        shown = Progress(**{**asdict(self.progress), "updated": time.time()})
        return render(shown)

    def _write(self) -> None:
        if self.file is not None:
            # a full disk must not stop training; the console still shows it
            with contextlib.suppress(OSError):
                self.progress.write(self.file)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
