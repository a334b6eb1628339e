"""Progress of long work (eval over a large set, WiSE-FT over many α, make-shards): tqdm's bar when
the stream is a terminal; otherwise (a log file, SLURM output) one line every ``interval_s``
seconds in tqdm's words (count, percentage, elapsed, remaining, rate), so logs stay readable."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %) [{elapsed} elapsed, {remaining} left, {rate_fmt}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed} elapsed, {rate_fmt}]"


class Progress:
    """Count work done: ``update(n)``, ``write(text)`` for a message that keeps the bar intact, and
    ``close()`` (or use it as a context manager). ``enabled=False`` shows nothing but messages.
    Bars and progress lines go to ``stream`` (default stderr)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "img", *, enabled: bool = True,
                 interval_s: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.enabled, self.interval_s = enabled, interval_s
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.bar = (tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)
                    if enabled and isatty is not None and isatty() else None)
        self.start = self.last = time.monotonic()

    def line(self) -> str:
        """The progress in one line, e.g. ``eval ft × imagenet: 2048/50000 img (4 %) [00:30 elapsed, 11:42 left, 68.3 img/s]``."""
        known = self.total is not None and self.total > 0
        return tqdm.format_meter(self.n, self.total if known else None, time.monotonic() - self.start, prefix=self.desc,
                                 unit=self.unit, bar_format=LINE_FORMAT if known else LINE_FORMAT_NO_TOTAL)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.interval_s:
            self.last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def write(self, text: str, file=None) -> None:
        """Print ``text`` to ``file`` (default stdout) without breaking the bar."""
        file = file if file is not None else sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
