"""Progress bars for long loops: transient, on stderr, and only when asked for and stderr is a terminal,
so logs, pipes and CI output stay free of carriage-return noise."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool, **kwargs: Any) -> tqdm:
    return tqdm(
        iterable, disable=not (enabled and sys.stderr.isatty()), leave=False, file=sys.stderr, **kwargs
    )
