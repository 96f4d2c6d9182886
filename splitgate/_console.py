"""rich helpers shared by CLI commands: progress bars and summary tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["progress_callback", "bundle_table"]


@contextmanager
def progress_callback(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(step, done, total)`` callable drawing one bar per step."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)

        yield update


def bundle_table(bundle: Any) -> Table:
    """A table of a plan bundle's partitions."""
    table = Table(title=f"plan bundle: {bundle.model_name}")
    for col in ("partition", "kind", "device nodes", "cut tensors", "cut bytes/sample"):
        table.add_column(col, justify="right" if "nodes" in col or "bytes" in col else "left")
    for p in bundle.partitions.values():
        table.add_row(
            p.id,
            p.kind,
            f"{p.device_nodes}/{p.total_nodes}",
            ", ".join(t.name for t in p.cut_tensors) or "-",
            "-" if p.cut_bytes is None else f"{p.cut_bytes:,}",
        )
    return table
