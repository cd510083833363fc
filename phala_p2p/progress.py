"""How a job's progress reads on a terminal: a bar that redraws itself in place (a TTY), or
plain lines now and then (a log, a pipe).

Rendering only: :class:`ProgressView` turns :class:`~phala_p2p.services.jobs.JobProgress`
updates into the text to write, and the time is a parameter (the caller passes its clock), so
it needs no event loop and no terminal to test. Writing the text is the caller's business.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from phala_p2p.services.jobs import JobProgress

TTY_INTERVAL: Final = 0.1  # seconds between redraws of the bar
PLAIN_INTERVAL: Final = 2.0  # seconds between plain lines (a phase change prints at once)
RATE_WINDOW: Final = 3.0  # seconds of samples the rate is measured over
BAR_WIDTH: Final = 20
CLEAR_LINE: Final = "\r\x1b[K"


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``"3.5 MiB"``)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


class ProgressView:
    """Text for a job's progress. ``tty``: a one-line bar, each update starting with a
    carriage return and a clear-to-end-of-line (``finish`` ends the line); otherwise plain
    lines ending in a newline, at most one per ``PLAIN_INTERVAL`` but for phase changes.

    ``size_known`` is False when the input's total is only an upper bound (a pipe): then no
    percentage is shown. ``width`` is the terminal's width (the bar line is cut to fit).
    """

    def __init__(
        self, *, tty: bool, size_known: bool = True, width: int = 80, prefix: str = "phala-p2p"
    ) -> None:
        self.tty = tty
        self.size_known = size_known
        self.width = max(20, width)
        self.prefix = prefix
        self.interval = TTY_INTERVAL if tty else PLAIN_INTERVAL
        self._samples: deque[tuple[float, int]] = deque()
        self._last_at: float | None = None
        self._last_phase = ""
        self._drawn = False  # a bar line is on screen, not yet ended

    def note(self, text: str, now: float) -> str:
        """A status message (``"syncing the chain"``): always shown."""
        self._last_at = now
        return self._line(text)

    def update(self, p: JobProgress, now: float) -> str | None:
        """The text to write for ``p`` now, or None when it is too soon after the last."""
        if p.phase == "streaming":
            self._sample(now, p.sent)
        changed = p.phase != self._last_phase
        if not changed and self._last_at is not None and now - self._last_at < self.interval:
            return None
        self._last_phase = p.phase
        self._last_at = now
        return self._line(self.describe(p, now))

    def finish(self) -> str:
        """What ends the display (a newline after a bar; nothing for plain lines)."""
        if self.tty and self._drawn:
            self._drawn = False
            return "\n"
        return ""

    def rate(self, now: float) -> float | None:
        """Bytes per second sent over the last ``RATE_WINDOW`` seconds (None: too early)."""
        if len(self._samples) < 2:
            return None
        t0, sent0 = self._samples[0]
        t1, sent1 = self._samples[-1]
        if t1 - t0 < 0.2:
            return None
        return (sent1 - sent0) / (t1 - t0)

    def describe(self, p: JobProgress, now: float) -> str:
        """``p`` in words: compact for the bar (``streaming [####----]  40% 25.8 MiB/64.0
        MiB 31.8 MiB/s out 25.1 MiB``), spelled out for a line."""
        parts = [p.phase]
        if p.phase in ("streaming", "settling", "done"):
            sent = format_bytes(p.sent)
            if self.size_known and p.total:
                pct = min(100, p.sent * 100 // p.total)
                if self.tty:
                    filled = pct * BAR_WIDTH // 100
                    parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
                    parts.append(f"{pct:3d}% {sent}/{format_bytes(p.total)}")
                else:
                    parts.append(f"{pct:3d}%")
                    parts.append(f"sent {sent} of {format_bytes(p.total)}")
            else:
                parts.append(sent if self.tty else f"sent {sent}")
            rate = self.rate(now) if p.phase == "streaming" else None
            if rate is not None:
                parts.append(f"{rate / (1 << 20):.1f} MiB/s")
            received = format_bytes(p.received)
            parts.append(f"out {received}" if self.tty else f"received {received}")
            if p.resumes:
                parts.append(f"resumed {p.resumes}x")
        return " ".join(parts) if self.tty else ", ".join(parts)

    def _sample(self, now: float, sent: int) -> None:
        if self._samples and sent < self._samples[-1][1]:
            self._samples.clear()  # a new job, or the count started over
        if len(self._samples) >= 2 and now - self._samples[-2][0] < 0.05:
            self._samples[-1] = (now, sent)  # updates come fast: keep samples >= 50 ms apart
        else:
            self._samples.append((now, sent))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()

    def _line(self, text: str) -> str:
        if self.tty:
            self._drawn = True
            return CLEAR_LINE + text[: self.width - 1]
        return f"{self.prefix}: {text}\n"


__all__ = ["ProgressView", "format_bytes"]
