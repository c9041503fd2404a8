"""Fault localisation from the gateway's own log: which version failed, where, since when, why.

The gateway writes one JSON line per failed inference request (event ``request.failed``: ts,
request_id, model, version, role, replica, route, status, reason, error) and, when a version
fails faster than its per-second line budget, one ``request.failures_suppressed`` line per
second with the rest counted by status and reason (``infra/gateway/faillog.py``). Given those
log files (``GatewayProcess.log_path``, by default ``<state_dir>/gateway.log``; under ``ballast
stack``, ``<state_dir>/stack/gateway.log``: see :func:`default_log_paths`), a model, a version
and a time window, :func:`localise` returns a :class:`FaultReport`: how many requests failed,
on which replica(s) and in what share, the first failure, the reasons counted, and the raw log
lines around the first failure (uvicorn tracebacks included, they are not JSON). The caller
(a canary rollback, the champion watchdog) adds the metric its judge tripped on, and publishes
:meth:`FaultReport.to_markdown` as an artifact.

A gateway also keeps its routed failure lines in files under its state folder and answers
``GET /admin/failures`` with its pod's report (:meth:`FaultReport.to_dict`); a watchdog reading
several pods rebuilds each (:meth:`FaultReport.from_dict`) and merges them
(:func:`merge_reports`).

Pure apart from reading the files; no Prefect, no MLflow. Files are streamed line by line, so
a large log costs time, not memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "EVENT_FAILED",
    "EVENT_SUPPRESSED",
    "FaultReport",
    "ReplicaShare",
    "default_log_paths",
    "localise",
    "markdown_cell",
    "merge_reports",
]

# The gateway's event names (infra/gateway/faillog.py; ballast does not import infra).
EVENT_FAILED = "request.failed"
EVENT_SUPPRESSED = "request.failures_suppressed"
# Lines are shown in the context cut to this.
_MAX_LINE_CHARS = 2000
# Lines are parsed up to this: a gateway failure line is bounded (its error text to 300
# characters), but JSON writes each non-ASCII one as a 6-character escape, so a line can pass
# 2000 characters. Anything longer is read in pieces and skipped: memory stays bounded.
_MAX_PARSE_CHARS = 64 * 1024
_MAX_REQUEST_IDS = 10


@dataclass(frozen=True, slots=True)
class ReplicaShare:
    """One replica's failures of the version and its share of all of them (0..1)."""

    replica: str
    failures: int
    share: float


@dataclass(frozen=True, slots=True)
class FaultReport:
    """What the gateway's log says about one version's failures in a time window."""

    model: str
    version: str
    start: datetime
    end: datetime
    failures: int  # every failed request counted: logged lines plus suppressed ones
    logged: int  # failures logged one line each
    replicas: tuple[ReplicaShare, ...]  # most failures first
    first_failure: datetime | None
    reasons: dict[str, int]  # most frequent first
    statuses: dict[int, int]
    roles: dict[str, int]
    first_request_ids: tuple[str, ...]  # of the first failures, oldest first
    context: tuple[str, ...]  # raw log lines around the first failure
    context_source: str | None  # "path:line" of the first failure
    metric: str | None = None  # the metric that broke, as the caller's judge says
    files: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = field(default=())
    # When each of first_request_ids failed (same order): lets reports of several pods merge.
    first_request_times: tuple[datetime, ...] = ()

    @property
    def failed(self) -> bool:
        return self.failures > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601)."""
        return {
            "model": self.model,
            "version": self.version,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "metric": self.metric,
            "failures": self.failures,
            "logged": self.logged,
            "replicas": [
                {"replica": r.replica, "failures": r.failures, "share": r.share}
                for r in self.replicas
            ],
            "first_failure": None if self.first_failure is None else self.first_failure.isoformat(),
            "reasons": dict(self.reasons),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "roles": dict(self.roles),
            "first_request_ids": list(self.first_request_ids),
            "first_request_times": [t.isoformat() for t in self.first_request_times],
            "context_source": self.context_source,
            "context": list(self.context),
            "files": list(self.files),
            "unreadable": list(self.unreadable),
        }

    @classmethod
    def from_dict(cls, data: Any) -> FaultReport:
        """A report back from :meth:`to_dict` (a gateway pod's ``/admin/failures`` answer).

        Raises ValueError on anything else, so a malformed answer is one clear error."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not an object")
            times = [_required_ts(t) for t in data.get("first_request_times") or []]
            first = data.get("first_failure")
            report = cls(
                model=str(data["model"]),
                version=str(data["version"]),
                start=_required_ts(data["start"]),
                end=_required_ts(data["end"]),
                metric=None if data.get("metric") is None else str(data["metric"]),
                failures=_count_of(data["failures"]),
                logged=_count_of(data["logged"]),
                replicas=tuple(
                    ReplicaShare(str(r["replica"]), _count_of(r["failures"]), float(r["share"]))
                    for r in data["replicas"]
                ),
                first_failure=None if first is None else _required_ts(first),
                reasons={str(k): _count_of(v) for k, v in data["reasons"].items()},
                statuses={int(k): _count_of(v) for k, v in data["statuses"].items()},
                roles={str(k): _count_of(v) for k, v in data["roles"].items()},
                first_request_ids=tuple(str(i) for i in data["first_request_ids"]),
                first_request_times=tuple(times),
                context=tuple(str(line) for line in data["context"]),
                context_source=(
                    None if data.get("context_source") is None else str(data["context_source"])
                ),
                files=tuple(str(f) for f in data.get("files") or []),
                unreadable=tuple(str(u) for u in data.get("unreadable") or []),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"not a fault report: {type(exc).__name__}: {exc}") from None
        if sum(r.failures for r in report.replicas) != report.failures:
            raise ValueError("not a fault report: its replicas' failures do not add up")
        if report.logged > report.failures:
            raise ValueError("not a fault report: more failures logged than counted")
        return report

    def to_markdown(self) -> str:
        """A Prefect markdown artifact: summary, tables, and the log around the first failure."""
        title = f"# Fault report: {self.model} version {self.version}"
        window = f"{_fmt(self.start)} to {_fmt(self.end)}"
        out = [title, ""]
        if self.metric:
            out += [f"**Metric that broke:** {markdown_cell(self.metric)}", ""]
        if not self.failed:
            out += [
                f"No failed request of version {self.version} in the gateway log, {window}.",
                "",
            ]
            out += _files_md(self)
            return "\n".join(out)
        assert self.first_failure is not None
        out += [
            f"**{self.failures} failed requests** between {window} "
            f"({self.logged} logged one by one, {self.failures - self.logged} counted in "
            f"per-second summaries). First failure at **{_fmt(self.first_failure)}**.",
            "",
            "| replica | failures | share |",
            "|---|---:|---:|",
        ]
        out += [
            f"| {markdown_cell(r.replica)} | {r.failures} | {r.share:.1%} |" for r in self.replicas
        ]
        out += ["", "| reason | count |", "|---|---:|"]
        out += [f"| {markdown_cell(k)} | {v} |" for k, v in self.reasons.items()]
        out += ["", "| status | count |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in sorted(self.statuses.items())]
        if self.roles:
            out += [
                "",
                "Roles: " + ", ".join(f"{markdown_cell(k)} {v}" for k, v in self.roles.items()),
            ]
        if self.first_request_ids:
            ids = ", ".join(f"`{markdown_cell(i)}`" for i in self.first_request_ids)
            out += ["", f"First failing request ids: {ids}"]
        if self.context:
            out += ["", f"## Log around the first failure ({self.context_source})", "", "```text"]
            # A line holding a fence would end the block early.
            out += [line.replace("```", "'''") for line in self.context]
            out += ["```"]
        out += ["", *_files_md(self)]
        return "\n".join(out)


def default_log_paths(state_dir: Path) -> list[Path]:
    """The gateway logs that exist under ``state_dir``: its own and the stack's."""
    candidates = [state_dir / "gateway.log", state_dir / "stack" / "gateway.log"]
    return [p for p in candidates if p.is_file()]


@dataclass(slots=True)
class _FileFirst:
    ts: datetime
    source: str
    context: list[str]
    after_left: int


@dataclass(slots=True)
class _Tally:
    failures: int = 0
    logged: int = 0
    replicas: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    # (ts, request id) of the earliest logged failures seen, kept sorted and short.
    first_ids: list[tuple[datetime, str]] = field(default_factory=list)
    first: datetime | None = None


def localise(
    log_paths: Path | str | Iterable[Path | str],
    model: str,
    version: str,
    start: datetime,
    end: datetime | None = None,
    *,
    metric: str | None = None,
    context_lines: int = 20,
    min_status: int = 500,
) -> FaultReport:
    """Read the gateway log(s) and report ``version``'s failures between ``start`` and ``end``.

    Only answers with status >= ``min_status`` count (default: server errors; 400 also counts a
    client's bad requests). ``context_lines`` raw lines are kept around the first failure
    (a quarter before it, the rest from it on). Naive datetimes are taken as UTC; ``end``
    defaults to now. Files that cannot be read are listed in ``unreadable``, not raised: a
    rollback must still get its report.
    """
    if context_lines < 0:
        raise ValueError("context_lines must be >= 0")
    start = _aware(start)
    end = _aware(end) if end is not None else datetime.now(UTC)
    if end < start:
        raise ValueError(f"the window ends ({end}) before it starts ({start})")
    paths = [Path(log_paths)] if isinstance(log_paths, str | Path) else [Path(p) for p in log_paths]
    tally = _Tally()
    firsts: list[_FileFirst] = []
    unreadable: list[str] = []
    before = context_lines // 4
    # Every file is opened before any is read, and a file met twice (by inode) read once: a
    # gateway rotating "r.jsonl" to "r.jsonl.1" between two opens would otherwise have its
    # lines counted twice.
    handles: list[tuple[Path, TextIO]] = []
    seen: set[tuple[int, int]] = set()
    with contextlib.ExitStack() as stack:
        for path in paths:
            try:
                # Non-blocking, then only regular files: opening a FIFO (or a device) that
                # happens to match would block the reader, here or in its first read.
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    st = os.fstat(fd)
                    regular = stat.S_ISREG(st.st_mode)
                    if regular:
                        os.set_blocking(fd, True)  # plain reads from here on
                except OSError:
                    os.close(fd)
                    raise
                if not regular:
                    os.close(fd)
                    unreadable.append(f"{path}: not a regular file")
                    continue
                opened = stack.enter_context(open(fd, encoding="utf-8", errors="replace"))
            except OSError as exc:
                unreadable.append(f"{path}: {exc.strerror or exc}")
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            handles.append((path, opened))
        for path, fh in handles:
            try:
                first = _scan(
                    path, fh, tally, model, version, start, end, min_status, before, context_lines
                )
            except OSError as exc:
                unreadable.append(f"{path}: {exc.strerror or exc}")
                continue
            if first is not None:
                firsts.append(first)
    earliest = min(firsts, key=lambda f: f.ts) if firsts else None
    total = tally.failures
    replicas = tuple(
        ReplicaShare(r, n, n / total) for r, n in sorted(tally.replicas.items(), key=_desc)
    )
    return FaultReport(
        model=model,
        version=version,
        start=start,
        end=end,
        failures=total,
        logged=tally.logged,
        replicas=replicas,
        first_failure=tally.first,
        reasons=dict(sorted(tally.reasons.items(), key=_desc)),
        statuses=dict(sorted(tally.statuses.items())),
        roles=dict(sorted(tally.roles.items(), key=_desc)),
        first_request_ids=tuple(i for _, i in tally.first_ids),
        first_request_times=tuple(t for t, _ in tally.first_ids),
        context=() if earliest is None else tuple(earliest.context),
        context_source=None if earliest is None else earliest.source,
        metric=metric,
        files=tuple(str(p) for p in paths),
        unreadable=tuple(unreadable),
    )


def merge_reports(
    reports: Iterable[tuple[str, FaultReport]], *, metric: str | None = None
) -> FaultReport:
    """One report from several sources' reports of one version and window: ``(source,
    report)`` pairs, a source being a gateway pod (each pod reads only its own replicas' files,
    so their counts add up). Files and the first failure's context are named by source.

    Raises ValueError on no report, or on reports of different versions."""
    pairs = list(reports)
    if not pairs:
        raise ValueError("no report to merge")
    model, version = pairs[0][1].model, pairs[0][1].version
    if any((r.model, r.version) != (model, version) for _, r in pairs):
        raise ValueError(f"reports of other versions than {model} version {version}")
    replicas: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    roles: Counter[str] = Counter()
    ids: list[tuple[datetime, str]] = []
    for source, r in pairs:
        for share in r.replicas:
            # Named by source where the name alone may not say which pod it is on.
            name = share.replica
            if len(pairs) > 1 and not name.startswith(source):
                name = f"{source}/{name}"
            replicas[name] += share.failures
        reasons.update(r.reasons)
        statuses.update(r.statuses)
        roles.update(r.roles)
        # Without their times (an older gateway), a report's ids count as at its first failure.
        times = r.first_request_times or (r.first_failure or r.end,) * len(r.first_request_ids)
        ids += zip(times, r.first_request_ids, strict=False)
    ids.sort()
    failed = [(r.first_failure, source, r) for source, r in pairs if r.first_failure is not None]
    earliest = min(failed, key=lambda f: f[0]) if failed else None
    total = sum(r.failures for _, r in pairs)
    return FaultReport(
        model=model,
        version=version,
        start=min(r.start for _, r in pairs),
        end=max(r.end for _, r in pairs),
        failures=total,
        logged=sum(r.logged for _, r in pairs),
        replicas=tuple(
            ReplicaShare(k, n, n / total)
            for k, n in sorted(replicas.items(), key=_desc)
            if n and total
        ),
        first_failure=None if earliest is None else earliest[0],
        reasons=dict(sorted(reasons.items(), key=_desc)),
        statuses=dict(sorted(statuses.items())),
        roles=dict(sorted(roles.items(), key=_desc)),
        first_request_ids=tuple(i for _, i in ids[:_MAX_REQUEST_IDS]),
        first_request_times=tuple(t for t, _ in ids[:_MAX_REQUEST_IDS]),
        context=() if earliest is None else earliest[2].context,
        context_source=(
            None
            if earliest is None or earliest[2].context_source is None
            else f"{earliest[1]}: {earliest[2].context_source}"
        ),
        metric=metric,
        # A source with no file is named too: it was read, and had no failure to keep.
        files=tuple(
            f"{source}: {f}" for source, r in pairs for f in (r.files or ("no failure file",))
        ),
        unreadable=tuple(f"{source}: {u}" for source, r in pairs for u in r.unreadable),
    )


def _scan(
    path: Path,
    fh: TextIO,
    tally: _Tally,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    min_status: int,
    before: int,
    context_lines: int,
) -> _FileFirst | None:
    """Add ``path``'s failures of the version to ``tally``; its first failure and context."""
    recent: deque[str] = deque(maxlen=before)
    first: _FileFirst | None = None
    needle = json.dumps(version)  # the version as it appears in a JSON line, quotes included
    lineno, whole = 0, True
    while raw := fh.readline(_MAX_PARSE_CHARS):
        # A piece of an over-long line (not a line of its own) is skipped.
        # (short of the limit without a newline: the file's last line)
        piece_of_long, whole = not whole, raw.endswith("\n") or len(raw) < _MAX_PARSE_CHARS
        if piece_of_long:
            continue
        lineno += 1
        full = raw.rstrip("\n")
        line = full[:_MAX_LINE_CHARS]
        if first is not None and first.after_left > 0:
            first.context.append(line)
            first.after_left -= 1
        found = None
        if whole and needle in full and full.startswith("{"):
            found = _failure(full, model, version, start, end, min_status)
        if found is not None:
            ts, n, event = found
            _count(tally, event, n, ts, min_status)
            if first is None:
                first = _FileFirst(
                    ts, f"{path}:{lineno}", [*recent, line], max(0, context_lines - before - 1)
                )
        if first is None:
            recent.append(line)
    return first


def _failure(
    line: str, model: str, version: str, start: datetime, end: datetime, min_status: int
) -> tuple[datetime, int, dict[str, Any]] | None:
    """(time, failures counted, event) when the line is a failure of the version in the window."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("version") != version:
        return None
    if event.get("model") != model:
        return None
    kind = event.get("event")
    if kind == EVENT_FAILED:
        status = event.get("status")
        if not isinstance(status, int) or status < min_status:
            return None
        stamp = event.get("ts")
        n = 1
    elif kind == EVENT_SUPPRESSED:
        stamp = event.get("first_ts") or event.get("ts")
        n = sum(c[2] for c in _counts(event) if c[0] >= min_status)
        if n == 0:
            return None
    else:
        return None
    ts = _parse_ts(stamp)
    if ts is None or not start <= ts <= end:
        return None
    return ts, n, event


def _counts(event: dict[str, Any]) -> list[tuple[int, str, int]]:
    out = []
    for item in event.get("counts") or []:
        if (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], int)
            and isinstance(item[2], int)
        ):
            out.append((item[0], str(item[1]), item[2]))
    return out


def _count(tally: _Tally, event: dict[str, Any], n: int, ts: datetime, min_status: int) -> None:
    tally.failures += n
    tally.replicas[str(event.get("replica") or "?")] += n
    role = event.get("role")
    if role:
        tally.roles[str(role)] += n
    if tally.first is None or ts < tally.first:
        tally.first = ts
    if event.get("event") == EVENT_FAILED:
        tally.logged += 1
        tally.reasons[str(event.get("reason") or "?")] += 1
        tally.statuses[int(event["status"])] += 1
        rid = event.get("request_id")
        if isinstance(rid, str):
            tally.first_ids.append((ts, rid))
            tally.first_ids.sort()
            del tally.first_ids[_MAX_REQUEST_IDS:]
        return
    for status, reason, k in _counts(event):
        if status >= min_status:
            tally.reasons[reason] += k
            tally.statuses[status] += k


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _aware(datetime.fromisoformat(value))
    except (ValueError, OverflowError):  # an offset past year 1 or 9999 overflows in UTC
        return None


def _required_ts(value: Any) -> datetime:
    ts = _parse_ts(value)
    if ts is None:
        raise ValueError(f"not an ISO 8601 time: {value!r}")
    return ts


def _count_of(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _desc(item: tuple[Any, int]) -> tuple[int, str]:
    return (-item[1], str(item[0]))


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def markdown_cell(text: str) -> str:
    """``text`` safe in one markdown table cell or line: a pipe or a newline would break it."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _files_md(report: FaultReport) -> list[str]:
    lines = ["Read: " + ", ".join(f"`{f}`" for f in report.files)]
    if report.unreadable:
        lines.append("Could not read: " + "; ".join(markdown_cell(u) for u in report.unreadable))
    return lines
