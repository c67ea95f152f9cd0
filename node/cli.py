"""``sijnode``: the service and the admin's window into it.

Every read command goes to the database, so it works while the service runs. Tables for
people, sized for an 80-column terminal (short UIDs, ``--wide`` for full ones); ``--json`` for
scripts, errors included. A UID argument may be any unique prefix or suffix of the UID, such
as the short form a table or a log line shows.

Exit codes: 0 ok; 1 not found or not running (an unknown UID, a stopped service, a peer
that does not answer); 2 invalid configuration or usage (a bad key, a missing pack, a port in
use, an ambiguous UID).

Heavy modules (pydicom, pynetdicom, torch, the chains) are imported by the commands that use
them, so a command that only reads the database prints within a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import Config, ConfigError, load_config
from node.uids import matching_uids, short_uid, unique_short_uids

if TYPE_CHECKING:
    from rich.console import Console

    from storage.store import Store

DEFAULT_CONFIG = "config.yaml"

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # an unknown UID or peer, the service not running, a peer not answering
EXIT_INVALID = 2  # invalid configuration or usage

#: Kinds of UID a command may take, and how tables and errors name them.
UID_KINDS = {"study": "study", "series": "series", "output": "output object"}

# Output objects the node writes, by SOP class, in words.
OUTPUT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.7": "heatmap",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.30": "param. map",  # Parametric Map
}


class CLIError(Exception):
    """A command cannot do what was asked: one line for people, an object for ``--json``."""

    def __init__(self, message: str, code: int = EXIT_NOT_FOUND, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- output ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__table__"):  # an ORM row
        return {c.name: _jsonable(getattr(value, c.key)) for c in value.__table__.columns}
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2))


def _ago(moment: datetime | None, never: str = "-") -> str:
    if moment is None:
        return never
    return _duration((_now() - moment).total_seconds()) + " ago"


def _until(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (moment - _now()).total_seconds()
    return "now" if seconds <= 0 else "in " + _duration(seconds)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


@dataclass(frozen=True)
class Column:
    """A table column: ``uid`` columns never shrink, ``num`` columns align right, ``text`` ones
    end in … when the terminal is narrow (``--wide`` shows them whole), ``wrap`` ones wrap."""

    header: str
    kind: str = "text"


class Output:
    """Where a command prints: rich for people (data never read as markup), JSON for scripts."""

    def __init__(self, json_mode: bool, wide: bool) -> None:
        self.json = json_mode
        self.wide = wide
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            # --wide: lines as long as their content (for a pager or a wide terminal).
            self._console = Console(width=400 if self.wide else None, highlight=False, soft_wrap=False)
        return self._console

    def line(self, text: str = "", style: str | None = None) -> None:
        """Print plain text (data may contain [brackets]: never markup)."""
        from rich.text import Text

        self.console.print(Text(text, style=style or ""))

    def table(self, title: str | None, columns: Sequence[Column], rows: Iterable[Sequence[Any]]) -> None:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        rows = [["-" if value is None or value == "" else str(value) for value in row] for row in rows]
        natural = [max([len(column.header), *(len(row[index]) for row in rows)]) for index, column in enumerate(columns)]
        widths = natural if self.wide else self._fit(columns, natural)
        table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for column, width in zip(columns, widths):
            table.add_column(
                column.header, no_wrap=column.kind != "wrap", overflow="fold" if column.kind == "wrap" else "ellipsis",
                justify="right" if column.kind == "num" else "left", width=width,
            )
        for row in rows:
            table.add_row(*(Text(value) for value in row))
        self.console.print(table)

    def _fit(self, columns: Sequence[Column], natural: list[int]) -> list[int]:
        """Column widths for the terminal: UIDs and numbers whole, text columns share what is left
        (each at least its header), so a row stays one line."""
        gaps = 3 * (len(columns) - 1)  # SIMPLE_HEAD without edges: one space of padding each side plus the rule
        fixed = sum(width for column, width in zip(columns, natural) if column.kind not in ("text", "wrap"))
        texts = [index for index, column in enumerate(columns) if column.kind in ("text", "wrap")]
        budget = self.console.width - gaps - fixed
        wanted = sum(natural[i] for i in texts)
        widths = list(natural)
        if texts and wanted > budget:
            # Shrink the widest text columns first, never below their header.
            for index in sorted(texts, key=lambda i: natural[i]):
                share = max(len(columns[index].header), budget // len(texts))
                widths[index] = min(natural[index], share)
                budget -= widths[index]
                texts = [i for i in texts if i != index]
        return widths


# -- shared pieces -----------------------------------------------------------------------------


def _open_store(config: Config) -> Store:
    from storage.store import open_store_quickly

    return open_store_quickly(config.database_url)


def _with_store(config: Config, read: Callable[[Store], Any]) -> Any:
    """``read(store)``, migrating the schema first if the database predates this version."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    store = _open_store(config)
    try:
        return read(store)
    except (OperationalError, ProgrammingError):
        store.migrate()
        return read(store)


def resolve_uid(store: Store, kind: str, text: str) -> str:
    """The full UID of a study/series/output from a unique prefix or suffix (or the short form)."""
    found = matching_uids(text, store.known_uids(kind))
    if not found:
        raise CLIError(f"no {UID_KINDS[kind]} {text}", EXIT_NOT_FOUND, uid=text)
    if len(found) > 1:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise CLIError(f"{text} matches {len(found)} {UID_KINDS[kind]} UIDs ({shown}); give more of it", EXIT_INVALID, uid=text, matches=found)
    return found[0]


_UID_IN_TEXT = re.compile(r"(?<![\d.])\d+(?:\.\d+){5,}(?![\d.])")


def shorten_uids_in(text: str, short: dict[str, str]) -> str:
    """Free text (a routing note) with each long UID in it shortened."""
    return _UID_IN_TEXT.sub(lambda match: short.get(match.group(0), short_uid(match.group(0))), text)


def _uid_text(out: Output, uid: str | None, short: dict[str, str]) -> str:
    if uid is None:
        return ""
    return uid if out.wide else short.get(uid, short_uid(uid))


def delivery_words(delivery: Any) -> str:
    """Where one delivery stands, in words."""
    state = delivery.state
    if state == "done":
        return f"delivered {_ago(delivery.delivered_at)}"
    if state == "sending":
        return f"sending now, {delivery.attempts} tries before: {delivery.last_error}" if delivery.attempts else "sending now"
    if state == "failed":
        return f"gave up after {delivery.attempts} attempt(s): {delivery.last_error}; sijnode retry re-queues"
    if delivery.attempts == 0:
        return "queued"
    return f"retry {_until(delivery.next_attempt_at)}, {delivery.attempts} tries: {delivery.last_error}"


def service_running(heartbeat: dict[str, Any] | None) -> bool:
    """The service is running when its heartbeat is fresh and, on this host, its pid is alive."""
    from node.heartbeat import still_running

    return bool(heartbeat) and still_running(heartbeat["pid"], heartbeat["host"], heartbeat["beat_at"], require_fresh=True)


# -- commands ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, config: Config, out: Output) -> int:
    from node.checks import config_problems
    from node.logs import setup_logging

    problems = config_problems(config)
    if problems:
        raise CLIError("cannot start: " + "; ".join(problems), EXIT_INVALID, problems=problems)
    from node.receiver import PortInUse
    from node.service import Service, ServiceStartError

    setup_logging(config.logging.level, config.logging.format, config.logging.file, config.logging.libraries)
    try:
        Service(config, str(Path(args.config).resolve())).run()
    except ServiceStartError as error:
        raise CLIError(str(error), EXIT_INVALID) from None
    except PortInUse as error:
        raise CLIError(f"cannot start: {error}", EXIT_INVALID) from None
    return EXIT_OK


def cmd_status(args: argparse.Namespace, config: Config, out: Output) -> int:
    from node.heartbeat import HEARTBEAT_NAME

    overview, next_attempts = _with_store(config, lambda store: (store.overview(), store.next_attempts()))
    heartbeat = overview["heartbeats"].get(HEARTBEAT_NAME)
    spool_dir = config.storage.data_dir
    usage = shutil.disk_usage(spool_dir if spool_dir.exists() else spool_dir.parent)
    destinations = {}
    for peer in config.destinations:
        health = overview["destination_health"].get(peer.name, {})
        destinations[peer.name] = {
            "ae_title": peer.ae_title,
            "address": f"{peer.host}:{peer.port}",
            "deliveries": overview["deliveries_by_destination"].get(peer.name, {}),
            "next_attempt_at": next_attempts.get(peer.name),
            **health,
        }
    running = service_running(heartbeat)
    report = {
        "running": running,
        "service": heartbeat,
        "studies": overview["studies"],
        "jobs": overview["jobs"],
        "deliveries": overview["deliveries"],
        "destinations": destinations,
        "counters": overview["counters"],
        "spool": {"path": str(spool_dir), "free_bytes": usage.free, "reserve_bytes": config.storage.free_space_reserve_mb * 2**20},
    }
    code = EXIT_OK if running else EXIT_NOT_FOUND
    if out.json:
        _print_json(report)
        return code
    if running:
        detail = heartbeat["detail"]
        out.line(
            f"● running: pid {heartbeat['pid']} on {heartbeat['host']}, AE {detail.get('ae_title')} port {detail.get('port')}, "
            f"{detail.get('workers')} worker(s), up {_duration((_now() - heartbeat['started_at']).total_seconds())}",
            "green",
        )
        if detail.get("metrics"):
            out.line(f"  metrics {detail['metrics']}/metrics, health {detail['metrics']}/health")
    else:
        last = f" (last heartbeat {_ago(heartbeat['beat_at'])})" if heartbeat else ""
        out.line(f"○ not running{last}; start it with: sijnode serve (or systemctl start sijnode)", "red")
    reserve = report["spool"]["reserve_bytes"]
    low = usage.free < reserve
    out.line(
        f"spool {spool_dir}: {usage.free / 2**30:.1f} GiB free, reserve {reserve / 2**30:.1f} GiB"
        + (": below the reserve, C-STORE answers 0xA700" if low else ""),
        "red" if low else None,
    )
    studies, jobs = overview["studies"], overview["jobs"]
    out.line(
        f"studies: {studies.get('receiving', 0)} receiving, {studies.get('complete', 0)} complete; "
        f"jobs: {jobs.get('pending', 0)} pending, {jobs.get('running', 0)} running, {jobs.get('done', 0)} done, {jobs.get('failed', 0)} failed"
    )
    rows, errors = [], []
    for name, d in destinations.items():
        counts = d["deliveries"]
        failing = d.get("last_failure_at") and (not d.get("last_success_at") or d["last_failure_at"] > d["last_success_at"])
        rows.append([name, f"{d['ae_title']}@{d['address']}", counts.get("pending", 0) + counts.get("sending", 0), counts.get("done", 0),
                     counts.get("failed", 0), _ago(d.get("last_success_at"), "never"), _until(d["next_attempt_at"]) if d["next_attempt_at"] else "-"])
        if failing:
            errors.append(f"  {name}, {_ago(d['last_failure_at'])}: {d.get('last_error')}")
    if rows:
        out.table(
            "Destinations",
            [Column("name"), Column("AE@address"), Column("waiting", "num"), Column("done", "num"), Column("failed", "num"),
             Column("last ok", "num"), Column("next try", "num")],
            rows,
        )
        for error in errors:
            out.line(error, "yellow")
    else:
        out.line("no destination: no peer has send_results: true")
    if overview["counters"]:
        out.table("Counters", [Column("event"), Column("count", "num")], sorted(overview["counters"].items()))
    return code


JOB_STATE_WORDS = {"pending": "wait", "running": "run", "done": "done", "failed": "FAIL"}


def _job_summary(states: dict[str, int] | None, note: str | None) -> str:
    """``2 done``, ``1 run 1 wait``: a study's jobs in a few characters."""
    if not states:
        return "no chain" if note and note.startswith("no applicable chain") else "-"
    return " ".join(f"{states[state]} {word}" for state, word in JOB_STATE_WORDS.items() if states.get(state))


def cmd_studies(args: argparse.Namespace, config: Config, out: Output) -> int:
    def read(store: Store) -> tuple:
        studies = store.list_studies(args.limit)
        uids = [s.study_uid for s in studies]
        return studies, store.job_states(uids), unique_short_uids(uids, store.known_uids("study"))

    studies, job_states, short = _with_store(config, read)
    if out.json:
        _print_json([{**_jsonable(s), "jobs": job_states.get(s.study_uid, {})} for s in studies])
        return EXIT_OK
    if not studies:
        out.line("no study received yet")
        return EXIT_OK
    rows = [
        [_uid_text(out, s.study_uid, short), s.study_date, s.description, s.instance_count,
         s.state + (f" v{s.version}" if s.version > 1 else ""), _job_summary(job_states.get(s.study_uid), s.routing_note),
         _ago(s.last_received_at)]
        for s in studies
    ]
    out.table(
        None,
        [Column("study", "uid"), Column("date", "uid"), Column("description"), Column("inst", "num"), Column("state", "uid"),
         Column("jobs"), Column("received", "num")],
        rows,
    )
    return EXIT_OK


def _is_summary_card(path: Path) -> bool:
    """Whether a Secondary Capture the node made is a study's results card, not a heatmap."""
    from pydicom import dcmread

    try:
        return "summary" in str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesDescription"]).get("SeriesDescription", ""))
    except Exception:  # a missing or unreadable file keeps the kind its SOP class gives
        return False


def _study_results(config: Config, store: Store, detail: dict[str, Any]) -> dict[str, Any]:
    """Findings per job of the study's current version (read from its SRs) and each output's deliveries."""
    from pipeline.report_reader import read_report
    from storage.spool import Spool

    study = detail["study"]
    spool = Spool(config.storage.data_dir)
    outputs_of: dict[int | None, list[Any]] = {}
    for output in detail["outputs"]:
        outputs_of.setdefault(output.job_id, []).append(output)
    deliveries_of: dict[str, list[Any]] = {}
    for delivery in detail["deliveries"]:
        deliveries_of.setdefault(delivery.output_uid, []).append(delivery)

    def add_outputs(entry: dict[str, Any], outputs: list[Any]) -> None:
        for output in outputs:
            kind = OUTPUT_KINDS.get(output.sop_class_uid, output.sop_class_uid)
            if kind == "SR":
                try:
                    report = read_report(spool.absolute(output.path))
                    if report.summary:  # the study summary repeats every chain's findings
                        kind = "summary SR"
                    else:
                        entry["findings"] += report.findings
                        entry["demonstration"] = report.demonstration
                except Exception as error:  # a missing or unreadable file is shown, not fatal
                    entry["error"] = f"cannot read the SR {output.path}: {type(error).__name__}: {error}"
            elif kind == "heatmap" and _is_summary_card(spool.absolute(output.path)):
                kind = "summary card"
            entry["outputs"].append({
                "sop_instance_uid": output.sop_instance_uid,
                "kind": kind,
                "path": str(spool.absolute(output.path)),
                "deliveries": [
                    {"destination": d.destination, "state": d.state, "attempts": d.attempts, "delivered_at": d.delivered_at,
                     "next_attempt_at": d.next_attempt_at if d.state == "pending" else None, "last_error": d.last_error,
                     "words": delivery_words(d)}
                    for d in deliveries_of.get(output.sop_instance_uid, [])
                ],
            })

    chains = []
    # Each chain's newest job: a chain whose inputs did not change keeps its last result.
    newest = {job.chain: job for job in sorted(detail["jobs"], key=lambda job: job.id)}
    for job in newest.values():
        entry: dict[str, Any] = {"job": job.id, "chain": job.chain, "state": job.state, "attempts": job.attempts,
                                 "finished_at": job.finished_at, "error": job.error, "findings": [], "demonstration": None, "outputs": []}
        add_outputs(entry, outputs_of.get(job.id, []))
        chains.append(entry)
    if outputs_of.get(None):  # the summary of a study no chain ran on belongs to no job
        entry = {"job": None, "chain": "study summary", "state": "done", "attempts": 0, "finished_at": outputs_of[None][-1].created_at,
                 "error": None, "findings": [], "demonstration": None, "outputs": []}
        add_outputs(entry, outputs_of[None])
        chains.append(entry)
    return {"study_uid": study.study_uid, "state": study.state, "version": study.version, "routing": study.routing_note, "chains": chains}


def _print_results(out: Output, results: dict[str, Any], short: dict[str, str]) -> None:
    if not results["chains"]:
        out.line(f"no results: {results['routing'] or 'the study has not completed yet'}")
        return
    for chain in results["chains"]:
        finished = f", {_ago(chain['finished_at'])}" if chain["finished_at"] else ""
        demo = "; DEMONSTRATION pack: not for diagnosis" if chain["demonstration"] else ""
        job = f"job {chain['job']} {chain['state']}" if chain["job"] is not None else f"no chain ran ({results['routing']})"
        out.line(f"{chain['chain']}: {job}{finished}{demo}", "bold")
        if chain["state"] != "done":
            waiting = {"pending": "waiting for a worker", "running": f"running now (attempt {chain['attempts']})"}.get(chain["state"], "")
            out.line(f"  {chain['error'] or waiting}" if chain["state"] == "failed" else f"  {waiting}" + (f"; last error: {chain['error']}" if chain["error"] else ""))
        if chain["findings"]:
            out.table(
                None,
                [Column("finding", "wrap"), Column("probability", "num"), Column("threshold", "num"), Column("decision", "uid")],
                [[f.finding, f"{f.probability:.3f}", "-" if f.threshold is None else f"{f.threshold:g}", f.decision] for f in chain["findings"]],
            )
        rows = [
            [_uid_text(out, output["sop_instance_uid"], short), output["kind"], d["destination"], d["words"]]
            for output in chain["outputs"]
            for d in (output["deliveries"] or [{"destination": "-", "words": "no destination"}])
        ]
        if rows:
            out.table(None, [Column("object", "uid"), Column("kind", "uid"), Column("to", "uid"), Column("delivery", "wrap")], rows)


def _study_detail(config: Config, text: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    def read(store: Store) -> tuple:
        study_uid = resolve_uid(store, "study", text)
        detail = store.study_detail(study_uid)
        known = store.known_uids("series") + store.known_uids("output")
        shown = [s.series_uid for s in detail["series"]] + [o.sop_instance_uid for o in detail["outputs"]]
        short = unique_short_uids(shown, known)
        short.update(unique_short_uids([study_uid], store.known_uids("study")))
        return detail, _study_results(config, store, detail), short

    return _with_store(config, read)


def _study_header(out: Output, study: Any, short: dict[str, str]) -> None:
    out.line(
        f"Study {_uid_text(out, study.study_uid, short)}: {study.state} v{study.version}, {study.instance_count} instances, "
        f"{study.study_date or 'no date'} {study.description or ''}".rstrip(),
        "bold",
    )
    if not out.wide:
        out.line(f"  {study.study_uid}")


def cmd_show(args: argparse.Namespace, config: Config, out: Output) -> int:
    detail, results, short = _study_detail(config, args.study_uid)
    if out.json:
        _print_json({**detail, "results": results})
        return EXIT_OK
    study = detail["study"]
    _study_header(out, study, short)
    if study.routing_note:
        out.line(f"routing: {study.routing_note if out.wide else shorten_uids_in(study.routing_note, short)}")
    out.table(
        "Series",
        [Column("series", "uid"), Column("#", "num"), Column("description"), Column("inst", "num"),
         Column("role", "uid"), Column("plane", "uid"), Column("in", "uid"), Column("rule")],
        [[_uid_text(out, s.series_uid, short), s.series_number, s.description, s.instance_count, s.role, s.plane,
          {True: "yes", False: "no"}.get(s.counts_as_input), s.rule] for s in detail["series"]],
    )
    if detail.get("objects"):
        from pydicom.uid import UID

        out.table(
            "Objects received",
            [Column("kind", "uid"), Column("SOP class"), Column("count", "num")],
            [[o["kind"], UID(o["sop_class_uid"]).name or o["sop_class_uid"], o["count"]] for o in detail["objects"]],
        )
    if detail["jobs"]:
        out.table(
            "Jobs",
            [Column("id", "num"), Column("chain", "uid"), Column("result", "num"), Column("study v", "num"), Column("state", "uid"),
             Column("tries", "num"), Column("finished", "num"), Column("error")],
            [[j.id, j.chain, getattr(j, "result_version", None), j.study_version, j.state, j.attempts, _ago(j.finished_at), j.error]
             for j in detail["jobs"]],
        )
    out.line("Results", "bold")
    _print_results(out, results, short)
    return EXIT_OK


def cmd_results(args: argparse.Namespace, config: Config, out: Output) -> int:
    text = args.study_uid
    if text is None:  # the newest study
        newest = _with_store(config, lambda store: store.list_studies(1))
        if not newest:
            raise CLIError("no study received yet", EXIT_NOT_FOUND)
        text = newest[0].study_uid
    detail, results, short = _study_detail(config, text)
    if out.json:
        _print_json(results)
        return EXIT_OK
    _study_header(out, detail["study"], short)
    _print_results(out, results, short)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace, config: Config, out: Output) -> int:
    def read(store: Store) -> tuple:
        jobs = store.list_jobs(args.state, args.limit)
        return jobs, unique_short_uids({j.study_uid for j in jobs}, store.known_uids("study"))

    jobs, short = _with_store(config, read)
    if out.json:
        _print_json(jobs)
        return EXIT_OK
    if not jobs:
        out.line("no job" + (f" in state {args.state}" if args.state else ""))
        return EXIT_OK
    rows = [[j.id, _uid_text(out, j.study_uid, short), j.chain, j.study_version, j.state, j.attempts, _ago(j.finished_at), j.error] for j in jobs]
    out.table(
        None,
        [Column("id", "num"), Column("study", "uid"), Column("chain", "uid"), Column("ver", "num"), Column("state", "uid"),
         Column("tries", "num"), Column("finished", "num"), Column("error")],
        rows,
    )
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, config: Config, out: Output) -> int:
    if args.destination and args.destination not in {p.name for p in config.destinations}:
        raise CLIError(f"no destination named {args.destination} (peers with send_results: {', '.join(p.name for p in config.destinations) or 'none'})", EXIT_NOT_FOUND)

    def write(store: Store) -> dict[str, int]:
        deliveries = store.retry_failed_deliveries(args.destination)
        jobs = 0 if args.deliveries_only else store.retry_failed_jobs()
        return {"deliveries_requeued": deliveries, "jobs_requeued": jobs}

    result = _with_store(config, write)
    if out.json:
        _print_json(result)
    else:
        out.line(f"re-queued {result['deliveries_requeued']} failed deliveries and {result['jobs_requeued']} failed jobs")
    return EXIT_OK


def _complete(args: argparse.Namespace, config: Config, out: Output, new_version: bool) -> int:
    from node.completion import complete_study

    store = _open_store(config)
    if getattr(args, "all", False):
        study_uids = store.studies_due(0)
    elif args.study_uid:
        study_uids = [resolve_uid(store, "study", args.study_uid)]
    else:
        raise CLIError("give a STUDY_UID (or --all)", EXIT_INVALID)
    results = [complete_study(store, config, uid, new_version=new_version) for uid in study_uids]
    if out.json:
        _print_json(results if getattr(args, "all", False) else results[0])
    elif not results:
        out.line("no study is waiting for its quiet period")
    for result in results if not out.json else ():
        if result.version is None:
            out.line(f"study {short_uid(result.study_uid)} received new instances while completing; try again", "yellow")
            continue
        chains = ", ".join(job.chain for job in result.jobs) or "none"
        out.line(f"study {short_uid(result.study_uid)} complete (version {result.version}); jobs: {chains}")
        out.line(f"  {result.note}")
    return EXIT_OK if all(r.version is not None for r in results) else EXIT_NOT_FOUND


def cmd_complete(args: argparse.Namespace, config: Config, out: Output) -> int:
    return _complete(args, config, out, new_version=False)


def cmd_reprocess(args: argparse.Namespace, config: Config, out: Output) -> int:
    return _complete(args, config, out, new_version=True)


def cmd_echo(args: argparse.Namespace, config: Config, out: Output) -> int:
    try:
        peer = config.peer(args.destination)
    except KeyError:
        raise CLIError(f"no peer named {args.destination} in the config (peers: {', '.join(p.name for p in config.peers) or 'none'})", EXIT_NOT_FOUND) from None
    from node.sender import echo

    ok, text = echo(config, peer)
    if out.json:
        _print_json({"destination": peer.name, "ok": ok, "detail": text})
    else:
        out.line(f"{'ok' if ok else 'failed'} {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}): {text}", "green" if ok else "red")
    return EXIT_OK if ok else EXIT_NOT_FOUND


def cmd_explain(args: argparse.Namespace, config: Config, out: Output) -> int:
    from pipeline.classify import classify_series, trace_classification

    record = _with_store(config, lambda store: store.series(resolve_uid(store, "series", args.series_uid)))
    # Classify afresh with the current rules, and show what was stored at completion beside it.
    now = classify_series(record.header, config.classification.rules, config.classification.tilt_tolerance_deg)
    result = {
        "series_uid": record.series_uid,
        "description": record.description,
        "current_rules": {"role": now.role.value, "plane": now.plane.value, "tilt_deg": now.tilt_deg, "counts_as_input": now.counts_as_input, "rule": now.rule, "reason": now.reason},
        "at_completion": {"role": record.role, "plane": record.plane, "rule": record.rule, "reason": record.reason},
        "header": record.header,
    }
    if args.verbose:
        settings = config.classification
        result["rules_tried"] = trace_classification(record.header, settings.rules, settings.tilt_tolerance_deg)
    if out.json:
        _print_json(result)
        return EXIT_OK
    tilt = f" (tilt {now.tilt_deg:.1f}°)" if now.tilt_deg is not None else ""
    out.line(f"{record.series_uid} {record.description or ''}", "bold")
    out.line(f"role {now.role.value}, plane {now.plane.value}{tilt}, {'an input' if now.counts_as_input else 'never an input'}")
    out.line(f"rule: {now.rule}")
    out.line(f"why: {now.reason}")
    if record.rule and (record.role, record.plane, record.rule) != (now.role.value, now.plane.value, now.rule):
        out.line(f"at completion it was {record.role}/{record.plane} by rule {record.rule}", "yellow")
    if args.verbose:
        out.line("Rules tried", "bold")
        for line in result["rules_tried"]:
            out.line(line)
    out.table("Header facts used", [Column("attribute", "uid"), Column("value")], sorted((k, v) for k, v in record.header.items()))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace, config: Config, out: Output) -> int:
    from node.checks import config_problems

    problems = config_problems(config)
    summary = {
        "config": str(Path(args.config).resolve()),
        "receiver": f"{config.receiver.ae_title} on {config.receiver.bind}:{config.receiver.port}",
        "database": config.database_url.split("@")[-1],
        "peers": [p.name for p in config.peers],
        "calling_ae_titles": "any" if config.receiver.allow_any_calling_ae else config.allowed_calling_ae_titles,
        "chains": [c.name for c in config.chains if c.enabled],
        "metrics": f"http://{config.metrics.bind}:{config.metrics.port}/metrics" if config.metrics.enabled else None,
        "problems": problems,
    }
    if out.json:
        _print_json(summary)
    else:
        for problem in problems:
            print(f"sijnode: {problem}", file=sys.stderr)
        out.line(f"{'config has problems' if problems else 'config ok'}: {summary['config']}", "red" if problems else "green")
        allowed = summary["calling_ae_titles"]
        out.line(
            f"receiver {summary['receiver']}, accepts calling AE titles: {allowed if isinstance(allowed, str) else ', '.join(allowed) or 'none'}; "
            f"database {summary['database']}; peers: {', '.join(summary['peers']) or 'none'}; chains: {', '.join(summary['chains']) or 'none'}"
        )
    return EXIT_INVALID if problems else EXIT_OK


def cmd_packs_list(args: argparse.Namespace, config: Config, out: Output) -> int:
    from node.checks import pack_problem
    from pipeline.packs import load_pack

    rows = []
    for chain in config.chains:
        entry: dict[str, Any] = {"chain": chain.name, "enabled": chain.enabled, "pack": chain.pack}
        problem = pack_problem(chain.pack) if chain.pack else None
        if problem:
            entry["error"] = problem
        elif chain.pack:
            manifest = load_pack(chain.pack).manifest
            entry.update(
                name=manifest.name,
                version=manifest.version,
                demo=manifest.demo,
                architecture=manifest.architecture.name,
                outputs={o.name: o.threshold for o in manifest.outputs},
                intended_use=manifest.intended_use,
                sha256=manifest.weights.sha256,
            )
        rows.append(entry)
    broken = [r for r in rows if r.get("error") and r["enabled"]]
    if out.json:
        _print_json(rows)
        return EXIT_INVALID if broken else EXIT_OK
    out.table(
        "Model packs",
        [Column("chain", "uid"), Column("pack", "uid"), Column("version", "uid"), Column("demo", "uid"), Column("outputs (threshold)"),
         Column("architecture")],
        [[r["chain"] + ("" if r["enabled"] else " (off)"), r.get("name") or "-", r.get("version"),
          "DEMO" if r.get("demo") else ("no" if "demo" in r else None),
          ", ".join(f"{k} ({v:g})" for k, v in r.get("outputs", {}).items()), r.get("architecture")] for r in rows],
    )
    if any(r.get("demo") for r in rows):
        out.line("DEMO = DEMONSTRATION pack (phantoms only), not for diagnosis")
    for r in rows:
        if r.get("error"):
            print(f"sijnode: chains[{r['chain']}].pack: {r['error']}", file=sys.stderr)
    return EXIT_INVALID if broken else EXIT_OK


def cmd_packs_verify(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    from node.checks import pack_problem, pack_problems

    if args.paths:
        checked = len(args.paths)
        problems = [problem for path in args.paths if (problem := pack_problem(path))]
    else:
        assert config is not None
        checked = len([c for c in config.chains if c.enabled and c.pack])
        problems = pack_problems(config)
    if out.json:
        _print_json({"checked": checked, "problems": problems})
    else:
        for problem in problems:
            print(f"sijnode: {problem}", file=sys.stderr)
        out.line(f"{checked - len(problems)} of {checked} pack(s) verified")
    return EXIT_INVALID if problems else EXIT_OK


def _pack_written(pack: Any, out: Output) -> int:
    """Say which pack an import wrote (folder, name, version, weights sha256)."""
    if out.json:
        _print_json({"pack": str(pack.folder), "name": pack.manifest.name, "version": pack.manifest.version, "sha256": pack.manifest.weights.sha256})
    else:
        out.line(f"wrote pack {pack.manifest.name} {pack.manifest.version} to {pack.folder}")
    return EXIT_OK


def cmd_packs_import_anatomy_aware(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    from pipeline.chains.xr_anatomy.importer import WeightsImportError, import_anatomy_aware

    try:
        pack = import_anatomy_aware(Path(args.classifier), Path(args.segmenter), Path(args.out), trust_pickle=args.trust_pickle)
    except WeightsImportError as error:
        raise CLIError(str(error), EXIT_INVALID) from None
    return _pack_written(pack, out)


def cmd_packs_import_ct_slices(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    """``sijnode packs import-ct-slices``: site-trained ResNeXt-50 / Inception-v4 checkpoints to a ct-slices pack."""
    from pipeline.chains.ct_slices.importer import WeightsImportError, import_ct_slices

    try:
        pack = import_ct_slices(
            Path(args.out),
            resnext50=Path(args.resnext50) if args.resnext50 else None,
            inception_v4=Path(args.inception_v4) if args.inception_v4 else None,
            threshold=args.threshold,
            trust_pickle=args.trust_pickle,
        )
    except WeightsImportError as error:
        raise CLIError(str(error), EXIT_INVALID) from None
    return _pack_written(pack, out)


def cmd_packs_import_t1stir_3d(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    """``sijnode packs import-t1stir-3d``: models trained with kbressem/spa to a t1stir-3d pack."""
    from pipeline.chains.t1stir_3d.importer import WeightsImportError, import_spa_models

    classifiers = {"active_inflammation": args.active, "asas_active_sacroiliitis": args.asas, "structural_lesions": args.structural}
    thresholds = {task: value for task, value in zip(classifiers, (args.threshold_active, args.threshold_asas, args.threshold_structural)) if value is not None}
    try:
        pack = import_spa_models(
            {task: Path(path) for task, path in classifiers.items()},
            {"T1": Path(args.denoiser_t1), "STIR": Path(args.denoiser_stir)},
            Path(args.out),
            thresholds=thresholds,
            trust_pickle=args.trust_pickle,
        )
    except WeightsImportError as error:
        raise CLIError(str(error), EXIT_INVALID) from None
    return _pack_written(pack, out)


def cmd_train(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    from pipeline.training import TrainingUsageError, train_chain

    try:
        pack = train_chain(
            args.chain,
            Path(args.data),
            Path(args.out),
            epochs=args.epochs,
            seed=args.seed,
            progress=not out.json,
            cache=Path(args.cache) if args.cache else None,
            base=Path(args.base) if args.base else None,
            retrain=[part.strip() for part in args.retrain.split(",") if part.strip()] if args.retrain else None,
        )
    except TrainingUsageError as error:
        raise CLIError(str(error), EXIT_INVALID) from None
    manifest = pack.manifest
    if out.json:
        _print_json({"pack": str(pack.folder), "name": manifest.name, "version": manifest.version, "evaluation": manifest.evaluation})
    else:
        out.line(f"wrote pack {manifest.name} {manifest.version} to {pack.folder}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    from pipeline.training import TrainingUsageError, check_evaluation, evaluate_pack

    if args.check:
        problems = check_evaluation(Path(args.pack), Path(args.data))
        if out.json:
            _print_json({"reproduced": not problems, "differences": problems})
        else:
            for problem in problems:
                out.line(problem)
            out.line("committed evaluation reproduced" if not problems else f"{len(problems)} differences from the committed evaluation")
        return EXIT_NOT_FOUND if problems else EXIT_OK
    try:
        report = evaluate_pack(Path(args.pack), Path(args.data), Path(args.out) if args.out else None, cache=Path(args.cache) if args.cache else None)
    except TrainingUsageError as error:
        raise CLIError(str(error), EXIT_INVALID) from None
    if out.json:
        _print_json(report)
        return EXIT_OK

    def shown(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    for output, scored in report["outputs"].items():
        rows = [[name, shown(m["value"]), f"{shown(m['ci95_low'])}–{shown(m['ci95_high'])}"] for name, m in scored["metrics"].items()]
        out.table(
            f"Evaluation: {output} (p ≥ {scored['threshold']:g})",
            [Column("metric", "uid"), Column("value", "num"), Column("95% CI (bootstrap)", "num")],
            rows,
        )
        rows = [[sub, r["studies"], r["positives"], shown(r["sensitivity"]), shown(r["specificity"])] for sub, r in scored["subgroups"].items()]
        out.table(
            "Per subgroup",
            [Column("subgroup"), Column("studies", "num"), Column("positive", "num"), Column("sensitivity", "num"), Column("specificity", "num")],
            rows,
        )
    for name in ("roc_png", "report"):
        if report.get(name):
            out.line(f"{name}: {report[name]}")
    return EXIT_OK


def cmd_phantom(args: argparse.Namespace, config: Config | None, out: Output) -> int:
    lesions: str | Path = args.lesions
    if lesions not in ("none", "random"):
        lesions = Path(lesions)
        if not lesions.exists():
            raise CLIError(f"--lesions: {lesions} does not exist (use none, random or a SPEC.json)", EXIT_INVALID)
    from pipeline.phantom import write_studies

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    folders = write_studies(Path(args.out), seed=args.seed, count=args.count, kinds=kinds, lesions=lesions, transfer_syntax=args.transfer_syntax)
    if out.json:
        _print_json([str(f) for f in folders])
    else:
        for folder in folders:
            out.line(f"wrote {folder}")
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------

NEEDS_NO_CONFIG = {"phantom", "train", "evaluate"}


class _Parser(argparse.ArgumentParser):
    """Usage errors become CLIError (exit 2, JSON with --json) instead of argparse's own exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see: {self.prog} --help)", EXIT_INVALID)


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before or after the command (``sijnode status --json``).
    common = _Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: $SIJNODE_CONFIG or ./config.yaml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output, errors included")
    common.add_argument("--wide", action="store_true", default=argparse.SUPPRESS, help="full UIDs and untruncated columns")
    parser = _Parser(
        prog="sijnode",
        description="DICOM node running sacroiliitis AI models.",
        epilog="UIDs: any unique prefix or suffix, e.g. the short form a table shows. "
        "Exit codes: 0 ok, 1 not found or not running, 2 invalid configuration or usage.",
    )
    parser.add_argument("--config", default=os.environ.get("SIJNODE_CONFIG", DEFAULT_CONFIG), help="config file (default: $SIJNODE_CONFIG or ./config.yaml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output, errors included")
    parser.add_argument("--wide", action="store_true", help="full UIDs and untruncated columns")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, handler: Callable, help_text: str, subparsers: Any = sub) -> argparse.ArgumentParser:
        command = subparsers.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    add("serve", cmd_serve, "run the node: receiver, workers, sender (SIGHUP reloads the config)")
    add("status", cmd_status, "running or not, queues, destinations and their last error, spool (exit 1 when not running)")
    add("studies", cmd_studies, "recent studies").add_argument("--limit", type=int, default=50)
    add("show", cmd_show, "one study: series, jobs, results and deliveries").add_argument("study_uid", metavar="STUDY_UID")
    add("results", cmd_results, "a study's findings (probability, threshold, decision), output objects and their delivery").add_argument(
        "study_uid", metavar="STUDY_UID", nargs="?", help="default: the newest study"
    )
    jobs = add("jobs", cmd_jobs, "recent jobs")
    jobs.add_argument("--state", choices=["pending", "running", "done", "failed"])
    jobs.add_argument("--limit", type=int, default=50)
    retry = add("retry", cmd_retry, "re-queue failed deliveries and failed jobs")
    retry.add_argument("--destination", help="only deliveries to this destination")
    retry.add_argument("--deliveries-only", action="store_true")
    add("reprocess", cmd_reprocess, "run a study's chains again as a new version").add_argument("study_uid", metavar="STUDY_UID")
    complete = add("complete", cmd_complete, "complete a study now instead of waiting for its quiet period")
    complete.add_argument("study_uid", metavar="STUDY_UID", nargs="?")
    complete.add_argument("--all", action="store_true", help="every study still receiving")
    add("echo", cmd_echo, "C-ECHO a configured peer").add_argument("destination", metavar="PEER")
    explain = add("explain", cmd_explain, "why a series got its role and plane")
    explain.add_argument("series_uid", metavar="SERIES_UID")
    explain.add_argument("--verbose", action="store_true", help="also every classification rule tried, in order, and why it did not match")
    config_cmd = sub.add_parser("config", help="check config.yaml", parents=[common])
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)
    add("check", cmd_config_check, "validate config.yaml and the files it names (exit 2 on a problem)", config_sub)
    packs_cmd = sub.add_parser("packs", help="model packs: list, verify, import-anatomy-aware, import-ct-slices, import-t1stir-3d", parents=[common])
    packs_sub = packs_cmd.add_subparsers(dest="packs_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)
    add("list", cmd_packs_list, "the configured chains' packs", packs_sub)
    verify = add("verify", cmd_packs_verify, "check packs' weights against their manifests (sha256)", packs_sub)
    verify.add_argument("paths", nargs="*", help="pack folders (default: the configured chains' packs)")
    anatomy = add(
        "import-anatomy-aware", cmd_packs_import_anatomy_aware,
        "import the published anatomy-aware weights (Dorfner et al. 2024) as an xr-anatomy pack", packs_sub,
    )
    anatomy.add_argument("--classifier", required=True, help="classification_model.ckpt (PyTorch Lightning checkpoint)")
    anatomy.add_argument("--segmenter", required=True, help="segmentation_model.pt (torch file with a 'network' entry)")
    anatomy.add_argument("--out", required=True, help="pack folder to write")
    anatomy.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (only for files from a trusted source)")
    anatomy.set_defaults(needs_config=False)
    ct_slices = add(
        "import-ct-slices", cmd_packs_import_ct_slices,
        "import site-trained ResNeXt-50 (torchvision layout) and/or Inception-v4 (timm layout) weights as a ct-slices pack", packs_sub,
    )
    ct_slices.add_argument("--resnext50", help="state dict of torchvision resnext50_32x4d with a 2-class fc")
    ct_slices.add_argument("--inception-v4", help="state dict of timm inception_v4 with num_classes=2")
    ct_slices.add_argument("--out", required=True, help="pack folder to write")
    ct_slices.add_argument("--threshold", type=float, default=0.5, help="operating threshold on the study probability (default 0.5)")
    ct_slices.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (only for files from a trusted source)")
    ct_slices.set_defaults(needs_config=False)
    spa = add(
        "import-t1stir-3d", cmd_packs_import_t1stir_3d,
        "import models trained with kbressem/spa (Bressem et al. 2022) as a t1stir-3d pack", packs_sub,
    )
    for flag, what in (
        ("--active", "active inflammatory lesions classifier"),
        ("--asas", "ASAS active sacroiliitis classifier"),
        ("--structural", "structural lesions classifier"),
        ("--denoiser-t1", "T1 denoising U-Net"),
        ("--denoiser-stir", "STIR (TIRM) denoising U-Net"),
    ):
        spa.add_argument(flag, required=True, help=f"fastai model file of the {what} ({{'model': state_dict, 'opt': ...}})")
    for flag in ("--threshold-active", "--threshold-asas", "--threshold-structural"):
        spa.add_argument(flag, type=float, default=None, help="operating threshold of that output (default 0.5; the paper's validation cut-offs are not published)")
    spa.add_argument("--out", required=True, help="pack folder to write")
    spa.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (only for files from a trusted source)")
    spa.set_defaults(needs_config=False)
    train = add("train", cmd_train, "train a chain's model pack on phantom studies")
    train.add_argument("chain")
    train.add_argument("--data", required=True, help="folder written by sijnode phantom")
    train.add_argument("--out", required=True, help="pack folder to write")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cache", default=None, help="folder for preprocessed studies, reused by later runs (chains that keep one: t1stir-3d, ct-slices)")
    train.add_argument("--base", default=None, help="a pack of the chain to start from (t1stir-3d, t1stir-quadrants)")
    train.add_argument(
        "--retrain", default=None,
        help="with --base, the comma-separated parts to train again, the rest kept: t1stir-3d outputs, t1stir-quadrants phases (contouring, classifier)",
    )
    evaluate = add("evaluate", cmd_evaluate, "evaluate a model pack on held-out phantom studies")
    evaluate.add_argument("pack")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--out", default=None, help="report folder (default: the pack folder)")
    evaluate.add_argument("--cache", default=None, help="folder of preprocessed studies, as for train")
    evaluate.add_argument("--check", action="store_true", help="regenerate on --data (all or some held-out studies) and compare with the pack's committed evaluation.json")
    phantom = add("phantom", cmd_phantom, "write synthetic sacroiliac-joint studies with ground truth")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--count", type=int, default=1)
    phantom.add_argument("--kinds", default="mri,ct,xr", help="comma-separated: mri, ct, xr")
    phantom.add_argument("--lesions", default="random", help="none, random or a SPEC.json")
    phantom.add_argument("--transfer-syntax", default=None, help="rle, jpeg-ls or jpeg2000 (default: uncompressed)")
    return parser


def _fail(error: CLIError, json_mode: bool) -> int:
    if json_mode:
        print(json.dumps(_jsonable({"error": str(error), "exit_code": error.code, **error.details}), indent=2))
    else:
        print(f"sijnode: {error}", file=sys.stderr)
    return error.code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_OK
        out = Output(args.json, args.wide)
        config: Config | None = None
        if args.command not in NEEDS_NO_CONFIG and getattr(args, "needs_config", True):
            try:
                config = load_config(args.config)
            except ConfigError as error:
                problems = str(error).splitlines()
                raise CLIError("invalid configuration " + "\n".join(problems), EXIT_INVALID, problems=problems) from None
        return args.handler(args, config, out)
    except CLIError as error:
        return _fail(error, json_mode)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
