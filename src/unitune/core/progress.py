"""The one progress bar: training steps, generation, merged tensors.

    with ProgressBar("merging tensors", total=n, console=console, enabled=show) as bar:
        ...
        bar.advance()                      # one more done
        bar.advance(info="loss=0.31")      # and a live note after the bar
        bar.update(completed=step)         # jump (a resumed run)

It shows `description  ━━━━━━━━  done/total  elapsed  info`. Disabled, it draws nothing and
costs nothing; `transient` removes it from the console when it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressBar:
    def __init__(
        self,
        description: str,
        total: int,
        *,
        console: Console | None = None,
        enabled: bool = True,
        transient: bool = False,
    ) -> None:
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not enabled,
            transient=transient,
        )
        self._task = self._bar.add_task(description, total=total, info="")

    def __enter__(self) -> ProgressBar:
        self._bar.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.stop()

    def advance(self, n: int = 1, *, info: str | None = None) -> None:
        """`n` more done; `info`, when given, replaces the note after the bar."""
        fields: dict[str, Any] = {} if info is None else {"info": info}
        self._bar.update(self._task, advance=n, **fields)

    def update(self, *, completed: int | None = None, info: str | None = None) -> None:
        """Set the count done and/or the note."""
        fields: dict[str, Any] = {} if info is None else {"info": info}
        self._bar.update(self._task, completed=completed, **fields)


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards": done in a
    moment, and noise among the console's lines) off inside the block; the Hugging Face Hub's
    download bars stay on (a download can be long). Restored on exit."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf

    was = hf.is_progress_bar_enabled()
    hub_was = not hub.are_progress_bars_disabled()
    hf.disable_progress_bar()  # transformers' bars, and the hub's with them ...
    if hub_was:
        hub.enable_progress_bars()  # ... which come back
    try:
        yield
    finally:
        if was:
            hf.enable_progress_bar()
        elif hub_was:
            hub.enable_progress_bars()
