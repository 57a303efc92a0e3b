"""Rendering a pull/seed event stream: live rich bars, plain lines, quiet, or JSON.

The agent sends events (see fleetp2p/admin/pull.py); a view turns them into
output. The live view is used only on a terminal: in a pipe or a log file,
rich's redraws would be noise, so one line per blob is printed instead.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

_TYPE_NAMES = {
    "application/vnd.oci.image.index.v1+json": "OCI image index",
    "application/vnd.oci.image.manifest.v1+json": "OCI image manifest",
    "application/vnd.oci.artifact.manifest.v1+json": "OCI artifact manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "Docker manifest list",
    "application/vnd.docker.distribution.manifest.v2+json": "Docker image manifest",
}
SOURCE_NAMES = (("upstream", "from upstream"), ("peer", "from peers"), ("local", "already local"))


def human_bytes(n: float) -> str:
    """Binary units, as registries and `du -h` count layer sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def short_digest(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def describe_type(media_type: str, artifact_type: str | None) -> str:
    if artifact_type:
        return f"OCI artifact {artifact_type}"
    return _TYPE_NAMES.get(media_type, media_type)


def summary_lines(summary: dict[str, Any], pinned_verb: str) -> list[str]:
    """The few lines printed after a pull or seed, live view or not."""
    by_source = summary.get("by_source") or {}
    seconds = float(summary.get("seconds") or 0.0)
    moved = sum(v for k, v in by_source.items() if k != "local")
    rate = f", {human_bytes(moved / seconds)}/s" if seconds > 0 and moved else ""
    platforms = summary.get("platforms") or []
    what = describe_type(summary.get("media_type", ""), summary.get("artifact_type"))
    if platforms:
        what += ": " + ", ".join(platforms)
    sources = ", ".join(f"{human_bytes(by_source.get(key, 0))} {name}" for key, name in SOURCE_NAMES)
    others = {k: v for k, v in by_source.items() if k not in dict(SOURCE_NAMES) and v}
    sources += "".join(f", {human_bytes(v)} from {k}" for k, v in others.items())
    lines = [f"{pinned_verb} {summary.get('ref')} → {summary.get('digest')} ({what})",
             f"  {summary.get('blobs')} blobs, {human_bytes(summary.get('bytes', 0))} in "
             f"{seconds:.1f} s{rate}: {sources}"]
    if summary.get("skipped"):
        lines.append(f"  {len(summary['skipped'])} non-distributable layers skipped")
    if summary.get("pinned"):
        lines.append(f"  pinned as {summary['pinned']} (release: fleetp2p seed --unpin "
                     f"{summary['pinned']})")
    return lines


def _blob_name(blob: dict[str, Any]) -> str:
    parts = [short_digest(blob["digest"]), blob.get("kind") or "blob"]
    if blob.get("platform"):
        parts.append(blob["platform"])
    return " ".join(parts)


class View(Protocol):
    def event(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class QuietView:
    """Prints only the pulled digest reference (`DIGEST=$(fleetp2p pull -q REF)`)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "summary":
            ref = str(event.get("ref", ""))
            name = ref.split("@", 1)[0]
            if ":" in name.rsplit("/", 1)[-1]:
                name = name.rsplit(":", 1)[0]
            print(f"{name}@{event.get('digest')}", file=self.console.file)  # never wrapped

    def close(self) -> None:
        pass


class JsonView:
    """One JSON object, the summary, for scripts."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "summary":
            data = {k: v for k, v in event.items() if k != "event"}
            print(json.dumps(data, indent=None, separators=(",", ":")), file=self.console.file)

    def close(self) -> None:
        pass


class PlainView:
    """Line per blob, for logs and pipes."""

    def __init__(self, console: Console, verb: str) -> None:
        self.console = console
        self.verb = verb
        self.names: dict[str, str] = {}

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "resolved":
            self.names = {b["digest"]: _blob_name(b) for b in event.get("blobs", [])}
            self._print(f"{event['ref']} → {event['digest']} "
                        f"({describe_type(event.get('media_type', ''), event.get('artifact_type'))}): "
                        f"{len(event.get('blobs', []))} blobs, {human_bytes(event.get('total_bytes', 0))}")
        elif kind == "blob_done":
            name = self.names.get(event["digest"], short_digest(event["digest"]))
            self._print(f"  {name}  {human_bytes(event['size'])}  {event.get('source')}")
        elif kind == "summary":
            for line in summary_lines(event, self.verb):
                self._print(line)

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        pass


class RichView(PlainView):
    """Live display: one bar for the whole reference, one per blob in flight
    (with its rate and source); finished blobs scroll above as plain lines."""

    def __init__(self, console: Console, verb: str) -> None:
        super().__init__(console, verb)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=30), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[source]}"),
            console=console, transient=False, refresh_per_second=8)
        self.total: TaskID | None = None
        self.tasks: dict[str, TaskID] = {}
        self.finished_bytes = 0
        self.by_source: dict[str, int] = {}

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "resolved":
            super().event(event)
            self.total = self.progress.add_task("total", total=max(event.get("total_bytes", 0), 1),
                                                source="")
            self.progress.start()
        elif kind == "blob_start" and event.get("source") != "local":
            digest = event["digest"]
            name = self.names.get(digest, short_digest(digest))
            self.tasks[digest] = self.progress.add_task(name, total=max(event["size"], 1),
                                                        source=event.get("source", ""))
        elif kind == "progress":
            for digest, done in (event.get("blobs") or {}).items():
                if digest in self.tasks:
                    self.progress.update(self.tasks[digest], completed=done)
            self._update_total(sum((event.get("blobs") or {}).values()))
        elif kind == "blob_done":
            task = self.tasks.pop(event["digest"], None)
            if task is not None:
                self.progress.remove_task(task)
            self.finished_bytes += event["size"]
            for source, count in (event.get("by_source") or {}).items():
                self.by_source[source] = self.by_source.get(source, 0) + count
            super().event(event)
            self._update_total(0)
        elif kind == "summary":
            self._update_total(0)
            self.progress.stop()
            super().event(event)

    def _update_total(self, active_bytes: int) -> None:
        if self.total is None:
            return
        sources = " · ".join(f"{k} {human_bytes(v)}" for k, v in self.by_source.items() if v)
        self.progress.update(self.total, completed=self.finished_bytes + active_bytes,
                             source=sources)

    def _print(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()


def make_view(console: Console, verb: str, quiet: bool, as_json: bool) -> View:
    if as_json:
        return JsonView(console)
    if quiet:
        return QuietView(console)
    if console.is_terminal:
        return RichView(console, verb)
    return PlainView(console, verb)
