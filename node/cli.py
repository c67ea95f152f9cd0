"""``sijnode``: the service and the admin's window into it.

Every read command goes to the database, so it works while the service runs. Tables for
people, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from rich.console import Console
from rich.table import Table

from node.config import Config, ConfigError, load_config
from storage.models import utcnow

DEFAULT_CONFIG = "config.yaml"
console = Console()
errors = Console(stderr=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__table__"):  # an ORM row
        return {c.name: _jsonable(getattr(value, c.key)) for c in value.__table__.columns}
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2))


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = int((utcnow() - moment).total_seconds())
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    return table


def _open_store(config: Config):
    from storage.store import open_store

    return open_store(config.database_url)


# -- commands ----------------------------------------------------------------------------------


def _enabled_chains_with_packs(config: Config) -> list:
    return [chain for chain in config.chains if chain.enabled and chain.pack]


def _pack_problem(folder: str) -> str | None:
    """What is wrong with the pack in ``folder`` (missing, bad manifest, sha256 mismatch), or None."""
    from pipeline.packs import PackError, load_pack

    try:
        load_pack(folder).verify()
    except PackError as error:
        return str(error)
    return None


def pack_problems(config: Config) -> list[str]:
    """Each enabled chain's pack must exist, have a valid manifest and match its sha256."""
    return [
        f"chains.{chain.name}.pack: {problem}"
        for chain in _enabled_chains_with_packs(config)
        if (problem := _pack_problem(chain.pack))
    ]


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from node.logs import setup_logging
    from node.receiver import PortInUse
    from node.service import Service

    problems = pack_problems(config)
    if problems:
        errors.print("[red]cannot start: model pack problems[/red]\n" + "\n".join(problems), highlight=False)
        return 2
    setup_logging(config.logging.level, config.logging.format, config.logging.file)
    try:
        Service(config, str(Path(args.config).resolve())).run()
    except PortInUse as error:
        errors.print(f"[red]cannot start: {error}[/red]", highlight=False)
        return 2
    return 0


def service_running(heartbeat: dict[str, Any] | None) -> bool:
    """The service is running when its heartbeat is fresh and, on this host, its pid is alive."""
    from node.service import HEARTBEAT_SECONDS

    if not heartbeat or utcnow() - heartbeat["beat_at"] > timedelta(seconds=HEARTBEAT_SECONDS * 3):
        return False
    if heartbeat["host"] == socket.gethostname():
        try:
            os.kill(heartbeat["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from node.service import HEARTBEAT_NAME

    store = _open_store(config)
    overview = store.overview()
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
            **health,
        }
    report = {
        "running": service_running(heartbeat),
        "service": heartbeat,
        "studies": overview["studies"],
        "jobs": overview["jobs"],
        "deliveries": overview["deliveries"],
        "destinations": destinations,
        "counters": overview["counters"],
        "spool": {"path": str(spool_dir), "free_bytes": usage.free, "reserve_bytes": config.storage.free_space_reserve_mb * 2**20},
    }
    if args.json:
        _print_json(report)
        return 0
    if report["running"]:
        detail = heartbeat["detail"]
        console.print(
            f"[green]● running[/green] pid {heartbeat['pid']} on {heartbeat['host']}, "
            f"AE {detail.get('ae_title')} port {detail.get('port')}, {detail.get('workers')} worker(s), "
            f"up since {heartbeat['started_at']:%Y-%m-%d %H:%M:%S} UTC"
        )
    else:
        last = f" (last heartbeat {_ago(heartbeat['beat_at'])})" if heartbeat else ""
        console.print(f"[red]○ not running[/red]{last}")
    free_gib = usage.free / 2**30
    low = usage.free < report["spool"]["reserve_bytes"]
    console.print(f"spool {spool_dir}: {'[red]' if low else ''}{free_gib:.1f} GiB free{' — below the reserve: C-STORE answers 0xA700' if low else ''}")
    states = ("pending", "running", "done", "failed")
    console.print(_table("Jobs", states, [[overview["jobs"].get(s, 0) for s in states]]))
    delivery_states = ("pending", "sending", "done", "failed")
    rows = [
        [name, d["ae_title"], d["address"], *(d["deliveries"].get(s, 0) for s in delivery_states), _ago(d.get("last_success_at")), d.get("last_error") if d.get("last_failure_at") and (not d.get("last_success_at") or d["last_failure_at"] > d["last_success_at"]) else "-"]
        for name, d in destinations.items()
    ]
    console.print(_table("Destinations", ["name", "AE", "address", *delivery_states, "last success", "last error"], rows))
    console.print(_table("Studies", ["receiving", "complete"], [[overview["studies"].get("receiving", 0), overview["studies"].get("complete", 0)]]))
    if overview["counters"]:
        console.print(_table("Counters", ["event", "count"], sorted(overview["counters"].items())))
    return 0


def cmd_studies(args: argparse.Namespace, config: Config) -> int:
    studies = _open_store(config).list_studies(args.limit)
    if args.json:
        _print_json(studies)
        return 0
    rows = [
        [s.study_uid, s.study_date, s.description, s.instance_count, s.state, s.version, _ago(s.last_received_at), s.routing_note]
        for s in studies
    ]
    console.print(_table("Studies", ["study UID", "date", "description", "instances", "state", "version", "last received", "routing"], rows))
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    detail = _open_store(config).study_detail(args.study_uid)
    if detail is None:
        errors.print(f"no study {args.study_uid}")
        return 1
    if args.json:
        _print_json(detail)
        return 0
    study = detail["study"]
    console.print(f"[bold]Study {study.study_uid}[/bold] — {study.state}, version {study.version}, {study.instance_count} instances; {study.routing_note or ''}")
    console.print(
        _table(
            "Series",
            ["series UID", "#", "modality", "description", "instances", "role", "plane", "input", "rule"],
            [[s.series_uid, s.series_number, s.modality, s.description, s.instance_count, s.role, s.plane, s.counts_as_input, s.rule] for s in detail["series"]],
        )
    )
    console.print(
        _table(
            "Objects received",
            ["kind", "SOP class", "count"],
            [[o["kind"], UID(o["sop_class_uid"]).name or o["sop_class_uid"], o["count"]] for o in detail["objects"]],
        )
    )
    console.print(
        _table(
            "Jobs",
            ["id", "chain", "result", "study version", "state", "attempts", "finished", "error"],
            [[j.id, j.chain, j.result_version, j.study_version, j.state, j.attempts, _ago(j.finished_at), j.error] for j in detail["jobs"]],
        )
    )
    console.print(
        _table(
            "Deliveries",
            ["output SOP instance UID", "destination", "state", "attempts", "delivered", "last error"],
            [[d.output_uid, d.destination, d.state, d.attempts, _ago(d.delivered_at), d.last_error] for d in detail["deliveries"]],
        )
    )
    return 0


def cmd_jobs(args: argparse.Namespace, config: Config) -> int:
    jobs = _open_store(config).list_jobs(args.state, args.limit)
    if args.json:
        _print_json(jobs)
        return 0
    rows = [[j.id, j.study_uid, j.chain, j.study_version, j.state, j.attempts, _ago(j.created_at), _ago(j.finished_at), j.error] for j in jobs]
    console.print(_table("Jobs", ["id", "study UID", "chain", "version", "state", "attempts", "created", "finished", "error"], rows))
    return 0


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    store = _open_store(config)
    deliveries = store.retry_failed_deliveries(args.destination)
    jobs = 0 if args.deliveries_only else store.retry_failed_jobs()
    result = {"deliveries_requeued": deliveries, "jobs_requeued": jobs}
    _print_json(result) if args.json else console.print(f"re-queued {deliveries} failed deliveries and {jobs} failed jobs")
    return 0


def _complete(args: argparse.Namespace, config: Config, new_version: bool) -> int:
    from node.completion import complete_study

    try:
        result = complete_study(_open_store(config), config, args.study_uid, new_version=new_version)
    except KeyError:
        errors.print(f"no study {args.study_uid}")
        return 1
    if result.version is None:
        errors.print("the study received new instances while completing; try again")
        return 1
    if args.json:
        _print_json(result)
    else:
        chains = ", ".join(job.chain for job in result.jobs) or "none"
        console.print(f"study {result.study_uid} complete (version {result.version}); jobs: {chains}\n{result.note}")
    return 0


def cmd_complete(args: argparse.Namespace, config: Config) -> int:
    return _complete(args, config, new_version=False)


def cmd_reprocess(args: argparse.Namespace, config: Config) -> int:
    return _complete(args, config, new_version=True)


def cmd_echo(args: argparse.Namespace, config: Config) -> int:
    from node.sender import echo

    try:
        peer = config.peer(args.destination)
    except KeyError as error:
        errors.print(str(error.args[0]))
        return 2
    ok, text = echo(config, peer)
    if args.json:
        _print_json({"destination": peer.name, "ok": ok, "detail": text})
    else:
        console.print(f"{'[green]ok[/green]' if ok else '[red]failed[/red]'} {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}): {text}")
    return 0 if ok else 1


def cmd_explain(args: argparse.Namespace, config: Config) -> int:
    from pipeline.classify import classify_series, trace_classification

    record = _open_store(config).series(args.series_uid)
    if record is None:
        errors.print(f"no series {args.series_uid}")
        return 1
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
    if args.json:
        _print_json(result)
        return 0
    tilt = f" (tilt {now.tilt_deg:.1f}°)" if now.tilt_deg is not None else ""
    console.print(f"[bold]{record.series_uid}[/bold] {record.description or ''}")
    console.print(f"role [bold]{now.role.value}[/bold], plane [bold]{now.plane.value}[/bold]{tilt}, {'an input' if now.counts_as_input else 'never an input'}")
    console.print(f"rule: {now.rule}\nwhy: {now.reason}")
    if record.rule and (record.role, record.plane, record.rule) != (now.role.value, now.plane.value, now.rule):
        console.print(f"[yellow]at completion it was {record.role}/{record.plane} by rule {record.rule}[/yellow]")
    if args.verbose:
        console.print("[bold]Rules tried[/bold]", *result["rules_tried"], sep="\n", highlight=False)
    console.print(_table("Header facts used", ["attribute", "value"], sorted((k, v) for k, v in record.header.items())))
    return 0


def cmd_config_check(args: argparse.Namespace, config: Config) -> int:
    problems = pack_problems(config)
    tls = config.receiver.tls
    for path in (tls.certificate, tls.private_key, tls.client_ca):
        if tls.enabled and path and not path.exists():
            problems.append(f"receiver.tls: {path} does not exist")
    summary = {
        "config": str(Path(args.config).resolve()),
        "receiver": f"{config.receiver.ae_title} on {config.receiver.bind}:{config.receiver.port}",
        "database": config.database_url.split("@")[-1],
        "peers": [p.name for p in config.peers],
        "chains": [c.name for c in config.chains if c.enabled],
        "problems": problems,
    }
    if args.json:
        _print_json(summary)
    else:
        for problem in problems:
            errors.print(f"[red]{problem}[/red]")
        console.print(f"{'[red]config has problems' if problems else '[green]config ok'}[/]: {summary['config']}")
        console.print(f"receiver {summary['receiver']}; database {summary['database']}; peers: {', '.join(summary['peers']) or 'none'}; chains: {', '.join(summary['chains']) or 'none'}")
    return 1 if problems else 0


def cmd_packs_list(args: argparse.Namespace, config: Config) -> int:
    from pipeline.packs import PackError, load_pack

    rows = []
    for chain in config.chains:
        entry: dict[str, Any] = {"chain": chain.name, "enabled": chain.enabled, "pack": chain.pack}
        try:
            manifest = load_pack(chain.pack).manifest if chain.pack else None
        except PackError as error:
            entry["error"] = str(error)
            manifest = None
        if manifest is not None:
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
    if args.json:
        _print_json(rows)
        return 0
    console.print(
        _table(
            "Model packs",
            ["chain", "pack", "version", "demo", "architecture", "outputs (threshold)", "sha256"],
            [
                [r["chain"] + ("" if r["enabled"] else " (disabled)"), r.get("name") or r.get("error") or r["pack"], r.get("version"),
                 "[yellow]DEMONSTRATION[/yellow]" if r.get("demo") else ("no" if "demo" in r else None), (r.get("architecture") or "")[:32],
                 ", ".join(f"{k} ({v:g})" for k, v in r.get("outputs", {}).items()), (r.get("sha256") or "")[:16]]
                for r in rows
            ],
        )
    )
    return 0


def cmd_packs_verify(args: argparse.Namespace, config: Config | None) -> int:
    if args.paths:
        checked = len(args.paths)
        problems = [problem for path in args.paths if (problem := _pack_problem(path))]
    else:
        assert config is not None
        checked = len(_enabled_chains_with_packs(config))
        problems = pack_problems(config)
    if args.json:
        _print_json({"checked": checked, "problems": problems})
    else:
        for problem in problems:
            errors.print(f"[red]{problem}[/red]", highlight=False)
        console.print(f"{checked - len(problems)} of {checked} pack(s) verified")
    return 1 if problems else 0


def cmd_packs_import_anatomy_aware(args: argparse.Namespace, config: Config | None) -> int:
    from pipeline.chains.xr_anatomy.importer import WeightsImportError, import_anatomy_aware

    try:
        pack = import_anatomy_aware(Path(args.classifier), Path(args.segmenter), Path(args.out), trust_pickle=args.trust_pickle)
    except WeightsImportError as error:
        errors.print(f"[red]{error}[/red]", highlight=False)
        return 1
    if args.json:
        _print_json({"pack": str(pack.folder), "name": pack.manifest.name, "version": pack.manifest.version, "sha256": pack.manifest.weights.sha256})
    else:
        console.print(f"wrote pack {pack.manifest.name} {pack.manifest.version} to {pack.folder}")
    return 0


def cmd_train(args: argparse.Namespace, config: Config | None) -> int:
    from pipeline.training import train_chain

    pack = train_chain(args.chain, Path(args.data), Path(args.out), epochs=args.epochs, seed=args.seed, progress=not args.json)
    manifest = pack.manifest
    if args.json:
        _print_json({"pack": str(pack.folder), "name": manifest.name, "version": manifest.version, "evaluation": manifest.evaluation})
    else:
        console.print(f"wrote pack {manifest.name} {manifest.version} to {pack.folder}")
    return 0


def cmd_evaluate(args: argparse.Namespace, config: Config | None) -> int:
    from pipeline.training import check_evaluation, evaluate_pack

    if args.check:
        problems = check_evaluation(Path(args.pack), Path(args.data))
        if args.json:
            _print_json({"reproduced": not problems, "differences": problems})
        else:
            for problem in problems:
                errors.print(problem, highlight=False)
            console.print("committed evaluation reproduced" if not problems else f"{len(problems)} differences from the committed evaluation")
        return 1 if problems else 0
    report = evaluate_pack(Path(args.pack), Path(args.data), Path(args.out) if args.out else None)
    if args.json:
        _print_json(report)
        return 0
    def shown(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    for output, scored in report["outputs"].items():
        rows = [[name, shown(m["value"]), f"{shown(m['ci95_low'])}–{shown(m['ci95_high'])}"] for name, m in scored["metrics"].items()]
        console.print(_table(f"Evaluation: {output} (p ≥ {scored['threshold']:g})", ["metric", "value", "95% CI (bootstrap)"], rows))
        rows = [[sub, str(r["studies"]), str(r["positives"]), shown(r["sensitivity"]), shown(r["specificity"])] for sub, r in scored["subgroups"].items()]
        console.print(_table("Per subgroup", ["subgroup", "studies", "positive", "sensitivity", "specificity"], rows))
    for name in ("roc_png", "report"):
        if report.get(name):
            console.print(f"{name}: {report[name]}")
    return 0


def cmd_phantom(args: argparse.Namespace, config: Config | None) -> int:
    from pipeline.phantom import write_studies

    lesions: str | Path = args.lesions
    if lesions not in ("none", "random"):
        lesions = Path(lesions)
        if not lesions.exists():
            errors.print(f"--lesions: {lesions} does not exist (use none, random or a SPEC.json)")
            return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    folders = write_studies(Path(args.out), seed=args.seed, count=args.count, kinds=kinds, lesions=lesions, transfer_syntax=args.transfer_syntax)
    if args.json:
        _print_json([str(f) for f in folders])
    else:
        for folder in folders:
            console.print(f"wrote {folder}")
    return 0


# -- parser ------------------------------------------------------------------------------------

NEEDS_NO_CONFIG = {"phantom", "train", "evaluate"}


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before or after the command (``sijnode status --json``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: $SIJNODE_CONFIG or ./config.yaml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    parser = argparse.ArgumentParser(prog="sijnode", description="DICOM node running sacroiliitis AI models.")
    parser.add_argument("--config", default=os.environ.get("SIJNODE_CONFIG", DEFAULT_CONFIG), help="config file (default: $SIJNODE_CONFIG or ./config.yaml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    add("serve", cmd_serve, "run the node: receiver, workers, sender")
    add("status", cmd_status, "running or not, jobs and deliveries per state, destinations, spool")
    add("studies", cmd_studies, "recent studies").add_argument("--limit", type=int, default=50)
    add("show", cmd_show, "one study: series, jobs, deliveries").add_argument("study_uid")
    jobs = add("jobs", cmd_jobs, "recent jobs")
    jobs.add_argument("--state", choices=["pending", "running", "done", "failed"])
    jobs.add_argument("--limit", type=int, default=50)
    retry = add("retry", cmd_retry, "re-queue failed deliveries and failed jobs")
    retry.add_argument("--destination", help="only deliveries to this destination")
    retry.add_argument("--deliveries-only", action="store_true")
    add("reprocess", cmd_reprocess, "run a study's chains again as a new version").add_argument("study_uid")
    add("complete", cmd_complete, "complete a study now instead of waiting for its quiet period").add_argument("study_uid")
    add("echo", cmd_echo, "C-ECHO a configured peer").add_argument("destination")
    explain = add("explain", cmd_explain, "why a series got its role and plane")
    explain.add_argument("series_uid")
    explain.add_argument("--verbose", action="store_true", help="also every classification rule tried, in order, and why it did not match")
    config_cmd = sub.add_parser("config", help="configuration commands", parents=[common])
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_sub.add_parser("check", help="validate config.yaml and the files it names", parents=[common])
    check.set_defaults(handler=cmd_config_check)
    packs_cmd = sub.add_parser("packs", help="model packs", parents=[common])
    packs_sub = packs_cmd.add_subparsers(dest="packs_command", required=True, metavar="SUBCOMMAND")
    packs_sub.add_parser("list", help="the configured chains' packs", parents=[common]).set_defaults(handler=cmd_packs_list)
    verify = packs_sub.add_parser("verify", help="check packs' weights against their manifests (sha256)", parents=[common])
    verify.add_argument("paths", nargs="*", help="pack folders (default: the configured chains' packs)")
    verify.set_defaults(handler=cmd_packs_verify)
    anatomy = packs_sub.add_parser(
        "import-anatomy-aware",
        help="import the published anatomy-aware weights (Dorfner et al. 2024) as an xr-anatomy pack",
        parents=[common],
    )
    anatomy.add_argument("--classifier", required=True, help="classification_model.ckpt (PyTorch Lightning checkpoint)")
    anatomy.add_argument("--segmenter", required=True, help="segmentation_model.pt (torch file with a 'network' entry)")
    anatomy.add_argument("--out", required=True, help="pack folder to write")
    anatomy.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (only for files from a trusted source)")
    anatomy.set_defaults(handler=cmd_packs_import_anatomy_aware, needs_config=False)
    train = add("train", cmd_train, "train a chain's model pack on phantom studies")
    train.add_argument("chain")
    train.add_argument("--data", required=True, help="folder written by sijnode phantom")
    train.add_argument("--out", required=True, help="pack folder to write")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    evaluate = add("evaluate", cmd_evaluate, "evaluate a model pack on held-out phantom studies")
    evaluate.add_argument("pack")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--out", default=None, help="report folder (default: the pack folder)")
    evaluate.add_argument("--check", action="store_true", help="regenerate on --data (all or some held-out studies) and compare with the pack's committed evaluation.json")
    phantom = add("phantom", cmd_phantom, "write synthetic sacroiliac-joint studies with ground truth")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--count", type=int, default=1)
    phantom.add_argument("--kinds", default="mri,ct,xr", help="comma-separated: mri, ct, xr")
    phantom.add_argument("--lesions", default="random", help="none, random or a SPEC.json")
    phantom.add_argument("--transfer-syntax", default=None, help="rle, jpeg-ls or jpeg2000 (default: uncompressed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config: Config | None = None
    if args.command not in NEEDS_NO_CONFIG and getattr(args, "needs_config", True):
        try:
            config = load_config(args.config)
        except ConfigError as error:
            errors.print(f"[red]invalid configuration[/red]\n{error}", markup=True, highlight=False)
            return 2
    try:
        return args.handler(args, config)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
