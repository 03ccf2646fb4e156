"""Output for every command: rich tables and progress on a terminal, plain lines when piped; the
environment header; exit codes."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


def environment() -> dict[str, str]:
    import jax

    import vsampler

    return {
        "vsampler": vsampler.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": str(jax.device_count()),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "implementations": ", ".join(vsampler.available_impls()),
    }


def yes(flag: bool) -> str:
    return "equal" if flag else "DIFFERENT"


def verified(r: dict[str, Any]) -> str:
    """A bench row's verification: yes (with its rounding-boundary rows, if any), or the agreeing rows."""
    boundary = f" ({r['boundary_rows']} at a rounding boundary)" if r.get("boundary_rows") else ""
    return ("yes" if r["verified"] else f"NO {r['agree_rows']}/{r['rows']}") + boundary


class PlainUI:
    """Text output for when rich (the `bench` extra) is not installed."""

    def header(self, title: str, env: dict[str, str]) -> None:
        print(title)
        for k, v in env.items():
            print(f"  {k}: {v}")

    def progress(self, total: int, phase: str) -> Any:
        """A context yielding `advance(label)`, called after each of `total` items of one phase: one line
        per item on stderr where it is a terminal, and one line on stdout when the phase ends."""
        return self._phase(total, phase, self._item_lines(total, phase) if sys.stderr.isatty() else None)

    @staticmethod
    def _item_lines(total: int, phase: str) -> Any:
        import contextlib

        @contextlib.contextmanager
        def lines() -> Any:
            done = [0]

            def advance(label: str) -> None:
                done[0] += 1
                print(f"{phase} [{done[0]}/{total}] {label}", file=sys.stderr, flush=True)

            yield advance

        return lines()

    def _phase(self, total: int, phase: str, items: Any) -> Any:
        import contextlib

        @contextlib.contextmanager
        def run() -> Any:
            start = time.perf_counter()
            done = [0]
            with items if items is not None else contextlib.nullcontext(None) as item:

                def advance(label: str) -> None:
                    done[0] += 1
                    if item is not None:
                        item(label)

                yield advance
            self.note(f"{phase}: {done[0]}/{total} done in {time.perf_counter() - start:.0f} s")
            sys.stdout.flush()

        return run()

    def table(self, results: list[dict[str, Any]], peers: list[str]) -> None:
        cols = ["config", "B", "V", "dtype", "impl", "ms", "spread", "x floor", *[f"vs {p}" for p in peers]]
        cols.append("verified")
        print("  ".join(f"{c:>12}" for c in cols))
        for r in results:
            cells = [
                r["config"],
                r["batch"],
                r["vocab"],
                r["dtype"],
                r["impl"],
                f"{r['median_ms']:.2f}",
                f"{100 * r['spread']:.0f}%",
                f"{r['x_floor']:.1f}",
                *[f"{r[f'speedup_vs_{p}']:.1f}x" for p in peers],
                verified(r),
            ]
            print("  ".join(f"{c!s:>12}" for c in cells))

    def rows(self, columns: list[str], rows: list[list[str]]) -> None:
        print("  ".join(columns))
        for row in rows:
            print("  ".join(row))

    def note(self, text: str) -> None:
        print(text)


class RichUI(PlainUI):
    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.progress_console = Console(stderr=True)  # progress stays off piped stdout (CI logs, | tee)

    def header(self, title: str, env: dict[str, str]) -> None:
        self.console.rule(f"[bold]{title}")
        line = "  ".join(f"[dim]{k}[/dim] {v}" for k, v in env.items())
        self.console.print(line, soft_wrap=not self.console.is_terminal)

    def progress(self, total: int, phase: str) -> Any:
        import contextlib

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if not self.progress_console.is_terminal:
            return self._phase(total, phase, None)

        @contextlib.contextmanager
        def bar() -> Any:
            with Progress(
                TextColumn(f"[bold]{phase}[/bold]"),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.progress_console,
                transient=True,
            ) as progress:
                task = progress.add_task("starting", total=total)

                def advance(label: str) -> None:
                    progress.update(task, advance=1, description=label)

                yield advance

        return self._phase(total, phase, bar())

    def _print(self, renderable: Any) -> None:
        """On a terminal, at its width; piped, at the renderable's own width (a table never wraps)."""
        if self.console.is_terminal:
            self.console.print(renderable)
            return
        console_width = self.console.width
        try:
            self.console.width = 10_000
            self.console.width = max(console_width, self.console.measure(renderable).maximum)
            self.console.print(renderable, crop=False)
        finally:
            self.console.width = console_width

    def table(self, results: list[dict[str, Any]], peers: list[str]) -> None:
        from rich.table import Table

        table = Table(
            caption="ms: median per call. spread: (slowest - fastest) / median. x floor: impl / one "
            "sum(exp(x - max)) pass. vs PEER: peer time / impl time (>1: vsampler faster); ratios are "
            "medians of per-round ratios."
        )
        cols = ["config", "B", "V", "dtype", "impl", "ms", "spread", "x floor", *[f"vs {p}" for p in peers]]
        for col in [*cols, "verified"]:
            left = col in ("config", "dtype", "impl", "verified")
            table.add_column(col, justify="left" if left else "right", no_wrap=True)
        for r in results:
            mark = f"[green]{verified(r)}" if r["verified"] else f"[red]{verified(r)}"
            table.add_row(
                r["config"],
                str(r["batch"]),
                str(r["vocab"]),
                r["dtype"].replace("float", "f"),
                r["impl"],
                f"{r['median_ms']:.2f}",
                f"{100 * r['spread']:.0f}%",
                f"{r['x_floor']:.1f}",
                *[f"{r[f'speedup_vs_{p}']:.2f}x" for p in peers],
                mark,
            )
        self._print(table)

    def rows(self, columns: list[str], rows: list[list[str]]) -> None:
        from rich.table import Table

        table = Table()
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*[f"[red]{c}" if c in ("MISMATCH", "DIFFERENT", "FAILED") else c for c in row])
        self._print(table)

    def note(self, text: str) -> None:
        self.console.print(text, soft_wrap=not self.console.is_terminal)


def ui_for_output() -> PlainUI:
    try:
        return RichUI()
    except ImportError:
        return PlainUI()
