"""Progress display for long work: requests done, generated tokens per second, ETA."""
from __future__ import annotations

import sys
import time


class TokenProgress:
    """A tqdm bar over requests with a tokens/s readout; plain periodic lines off a terminal."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "generating", initial: int = 0):
        self.enabled = enabled
        self.tokens = 0
        self.start = time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="req", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        if self._bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self._bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)

    def add_requests(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
