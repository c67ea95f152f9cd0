"""The C-STORE / C-ECHO SCP: the receive stage.

An instance is answered Success only after its file is in the spool (fsynced, renamed into
place) and its row is committed. Anything that goes wrong with one instance gets the matching
C-STORE failure status and the association carries on.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import signal
import socket
import ssl
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from node import metrics
from node.admission import AdmissionPolicy, GatedAssociationServer, GuardedACSE, OversizedDataset
from node.config import Config
from node.logs import log_event
from node.reactor import QueueWaitAssociation
from node.slots import SlotBoard
from node.uids import short_uid
from node.validation import InstanceRejected, Status, check_structure, check_usable, read_instance
from pipeline.classify import INPUT_SOP_CLASSES, header_summary, sijnode_result_evidence
from storage.models import InstanceKind
from storage.spool import Spool, SpoolFullError
from storage.store import IncomingInstance, Store

log = logging.getLogger("sijnode.receiver")

IMAGE_STORAGE_CLASSES = (
    MRImageStorage,
    EnhancedMRImageStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

# Uncompressed, deflated, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE.
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
# Objects that are never inputs are stored as received and never decoded: every transfer syntax
# pydicom knows, except those whose pixel data lives elsewhere (JPIP) or is a raw video/audio
# stream (SMPTE ST 2110), which pydicom cannot read as a dataset's pixel data.
NON_INPUT_TRANSFER_SYNTAXES = [
    str(uid) for uid in AllTransferSyntaxes if not uid.startswith(("1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205", "1.2.840.10008.1.2.7."))
]


def presentation_contexts(accept_any_storage: bool) -> list:
    """The SCP's supported contexts plus Verification.

    With ``accept_any_storage`` (the default) every storage SOP class pynetdicom knows, so that a
    PACS pushing a whole study (SR, KOS, presentation states, SEG, PDF, RT, ...) never fails
    because of the node: input-capable image classes in the syntaxes the chains decode, the rest
    in every syntax it can store as received. Without it, only the image classes.
    """
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts] if accept_any_storage else list(IMAGE_STORAGE_CLASSES)
    contexts = [
        build_context(uid, ACCEPTED_TRANSFER_SYNTAXES if uid in IMAGE_STORAGE_CLASSES or uid in INPUT_SOP_CLASSES else NON_INPUT_TRANSFER_SYNTAXES)
        for uid in classes
    ]
    contexts.append(build_context(Verification))
    return contexts


def instance_kind(dataset: Dataset, sop_class_uid: str) -> str:
    """What the object is to the node, from its header: a sijnode result, an input-capable image,
    or a non-input object (the store turns a known output UID into own-result)."""
    if sijnode_result_evidence(dataset) is not None:
        return InstanceKind.SIJNODE_RESULT
    return InstanceKind.INPUT if sop_class_uid in INPUT_SOP_CLASSES else InstanceKind.NON_INPUT


def _text(dataset: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = dataset.get(keyword)
    return None if value in (None, "") else str(value)[:limit]


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class StoreRequest:
    """What the SCP handed over for one C-STORE, independent of pynetdicom's Event."""

    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    calling_ae_title: str
    # The instance as a DICOM file: preamble, file meta (from the presentation context) and
    # the dataset exactly as received.
    encoded: bytes
    study_uid: str | None = None  # filled in once the dataset is read
    # The delivering association, when the request came over one (not in direct calls).
    delivery: "_Delivery | None" = None


# Metric labels (a few fixed words) for GuardedACSE's rejection reasons; the rest are slot limits.
REJECTION_LABELS = {
    None: "calling-ae",
    "calling AE title not recognized": "calling-ae",
    "source address not allowed": "address",
    "called AE title not recognized": "called-ae",
}


@dataclass
class _Delivery:
    """What one association delivered: its durable key and the studies already recorded for it."""

    key: str
    studies: set[str] = field(default_factory=set)


class _SharedPortServer(GatedAssociationServer):
    """The gated association server bound with SO_REUSEPORT: several receiver processes listen on
    the one port and the kernel spreads new connections over them (one Python process is bound by
    its GIL; bench/README.md). ``claim_port`` keeps a second service off the port. Its associations
wait on their DIMSE queue instead of pynetdicom's 1 ms reactor sleep (node/reactor.py)."""

    association_class = QueueWaitAssociation

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class PortInUse(RuntimeError):
    """Another sijnode service already listens on the receiver's port."""


def claim_port(port: int) -> socket.socket:
    """Hold the receiver's port for this service: a Linux abstract socket named after it.

    SO_REUSEPORT lets every process of the same user bind the port, so a second service would
    silently share the traffic. Only one process can bind an abstract socket name; the kernel
    frees it when the process dies, even by kill -9. Keep the returned socket open.
    """
    guard = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        guard.bind(f"\0sijnode-receiver-port-{port}")
    except OSError:
        guard.close()
        raise PortInUse(f"another sijnode service listens on port {port}") from None
    return guard


def slot_board(config: Config) -> SlotBoard:
    """Where the receiver processes of this service count their association slots together
    (node/slots.py); a single receiver process counts its own."""
    return SlotBoard(config.storage.data_dir / "receiver-slots.json" if config.receiver_count > 1 else None)


class Receiver:
    """Owns the pynetdicom AE and turns C-STORE requests into spool files and rows."""

    def __init__(self, config: Config, store: Store, spool: Spool) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        # Connections the gate closed before their association request, reported in batches.
        self._drops: Counter[tuple[str, str]] = Counter()
        self._drops_lock = threading.Lock()
        self._drops_stop = threading.Event()
        self.server: GatedAssociationServer | None = None
        # Instances stored per open association and study, for one "study received" line each.
        self._received: dict[int, Counter[str]] = {}
        self._received_lock = threading.Lock()
        # The process that owns this receiver's associations in the database (AssociationStudy).
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._serials = itertools.count(1)
        self._deliveries: dict[int, _Delivery] = {}  # id(Association) -> what it delivered
        self._deliveries_lock = threading.Lock()
        self.board = slot_board(config)
        if config.logging.level != "DEBUG":
            # pynetdicom's "standard" handlers format a log text for every PDU and DIMSE message
            # even when nothing is logged at that level: off the hot path unless debugging.
            _config.LOG_HANDLER_LEVEL = "none"

    # -- pynetdicom event handlers ------------------------------------------------------------

    def handle_echo(self, event: evt.Event) -> int:
        """EVT_C_ECHO: always Success while the service runs."""
        return Status.SUCCESS

    def handle_accepted(self, event: evt.Event) -> None:
        """EVT_ACCEPTED: an association is open (metrics)."""
        with self._received_lock:
            self._received[id(event.assoc)] = Counter()
        metrics.association_accepted()

    def _log_received(self, event: evt.Event) -> None:
        """An accepted association ended (released or aborted): one line per study it brought."""
        with self._received_lock:
            received = self._received.pop(id(event.assoc), None)
        if received is None:
            return  # rejected, never accepted
        metrics.association_closed()
        for study_uid, count in received.items():
            log_event(
                log,
                logging.INFO,
                f"study received: {count} instance(s) of study {short_uid(study_uid)} from {event.assoc.requestor.ae_title}",
                study_uid=study_uid,
                instances=count,
                calling_ae=event.assoc.requestor.ae_title,
                aborted=event.assoc.is_aborted,
            )

    def apply_config(self, config: Config) -> None:
        """Take a reloaded config: allowlists apply to the next association, open ones carry on."""
        self.config = config
        if self.server is not None:
            self.server.ae.require_calling_aet = self._calling_ae_allowlist()
            # Associations already negotiated keep the policy they were admitted by.
            self.server.policy = AdmissionPolicy(config.receiver, [peer.ae_title for peer in config.peers], self.board)

    def _calling_ae_allowlist(self) -> list[str]:
        if self.config.receiver.allow_any_calling_ae:
            return []  # pynetdicom: an empty list accepts any calling AE title
        # An empty list would switch pynetdicom's check off; a title nobody uses keeps it on.
        return self.config.allowed_calling_ae_titles or ["\x00NO-PEERS"]

    def handle_rejected(self, event: evt.Event) -> None:
        """EVT_REJECTED: count and log each rejection once, by its cause."""
        acse = event.assoc.acse
        reason = acse.rejection if isinstance(acse, GuardedACSE) else None
        by_address = reason == "source address not allowed"
        metrics.association_rejected(REJECTION_LABELS.get(reason, "limit"))
        self.store.count("associations_rejected_address" if by_address else "associations_rejected")
        log_event(
            log,
            logging.WARNING,
            f"association rejected: {reason}" if reason else "association rejected",
            calling_ae=event.assoc.requestor.ae_title,
            address=event.assoc.requestor.address,
        )

    def connection_dropped(self, reason: str, address: str) -> None:
        """A connection closed before its association request was complete (see node/admission.py).

        Called on the gate's thread, which must never wait for the database: counted here,
        logged and stored as one summary per interval (a flood does not flood the log).
        """
        with self._drops_lock:
            self._drops[(reason, address)] += 1

    def _report_drops(self, interval_s: float = 2.0) -> None:
        while not self._drops_stop.wait(interval_s):
            self._flush_drops()
            self.board.reconcile()  # slots of associations whose close went unnoticed

    def _flush_drops(self) -> None:
        with self._drops_lock:
            drops, self._drops = self._drops, Counter()
        if not drops:
            return
        by_reason: Counter[str] = Counter()
        for (reason, address), count in drops.items():
            by_reason[reason] += count
        for reason, count in by_reason.items():
            addresses = sorted({address for (r, address) in drops if r == reason})
            log_event(log, logging.WARNING, f"connections closed: {reason}", connections=count, addresses=addresses[:10])
        try:
            self.store.count("connections_closed_before_association", sum(by_reason.values()))
        except Exception:  # the counter is informational; the database may be down
            log.warning("could not count closed connections")

    def bad_command(self, reason: str) -> None:
        """A C-STORE whose command set could not be taken: answered with a failure status."""
        log_event(log, logging.WARNING, "C-STORE refused", status=f"0x{Status.CANNOT_UNDERSTAND:04X}", reason=reason)

    def handle_store(self, event: evt.Event) -> int:
        """EVT_C_STORE: persist, then answer; any failure becomes a C-STORE failure status."""
        if isinstance(event.request.DataSet, OversizedDataset):  # the DIMSE layer kept none of it
            oversized = StoreRequest(str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID), event.assoc.requestor.ae_title, b"")
            limit = event.request.DataSet.limit
            return self._rejected(oversized, Status.OUT_OF_RESOURCES, f"dataset larger than {limit} bytes (receiver.limits.max_dataset_bytes)")
        request = StoreRequest(
            affected_sop_class_uid=str(event.request.AffectedSOPClassUID),
            affected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            calling_ae_title=event.assoc.requestor.ae_title,
            encoded=event.encoded_dataset(include_meta=True),
            delivery=self._delivery(event.assoc),
        )
        status = self.store_instance(request)
        metrics.instance_answered(status)
        if status == Status.SUCCESS:
            with self._received_lock:
                received = self._received.get(id(event.assoc))
                if received is not None and request.study_uid:
                    received[request.study_uid] += 1
        return status

    # -- association ends: completion follows the sender ----------------------------------------

    def _delivery(self, assoc: object) -> _Delivery:
        with self._deliveries_lock:
            delivery = self._deliveries.get(id(assoc))
            if delivery is None:
                delivery = self._deliveries[id(assoc)] = _Delivery(f"{self.owner}:{next(self._serials)}")
            return delivery

    def handle_released(self, event: evt.Event) -> None:
        """EVT_RELEASED: the sender is done with this association; its studies may complete soon."""
        self._association_ended(event.assoc, released=True)

    def handle_conn_close(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: an association closed without release (abort, lost connection) was cut off.

        The DUL thread may close the connection before the reactor thread fires EVT_RELEASED for
        the same association: a close in state Sta13 (A-RELEASE-RP sent, awaiting the close; PS3.8
        9.2) is a release. Sta13 also follows an abort sent by this node (network timeout), after
        which the sender has been silent longer than the quiet period anyway.
        """
        self._log_received(event)
        self.board.release(event.assoc)  # its slot, counted node-wide (node/slots.py)
        self._association_ended(event.assoc, released=event.assoc.dul.state_machine.current_state == "Sta13")

    def _association_ended(self, assoc: object, released: bool) -> None:
        with self._deliveries_lock:
            delivery = self._deliveries.pop(id(assoc), None)
        if delivery is None or not delivery.studies:
            return
        try:
            self.store.association_ended(delivery.key, released)
        except Exception as error:  # the row stays open: its studies complete by the quiet period
            log_event(log, logging.WARNING, "could not record the end of an association", error=type(error).__name__)

    # -- the receive stage --------------------------------------------------------------------

    def store_instance(self, request: StoreRequest) -> int:
        """Persist one instance; returns the C-STORE status."""
        try:
            self.spool.check_free_space()
            incoming = self._accept(request)
        except InstanceRejected as rejected:
            return self._rejected(request, rejected.status, rejected.reason)
        except SpoolFullError as error:
            return self._rejected(request, Status.OUT_OF_RESOURCES, str(error))
        except OSError as error:
            return self._rejected(request, Status.OUT_OF_RESOURCES, f"spool write failed: {error.strerror or error}")
        delivery = request.delivery
        if delivery is not None and incoming.study_uid not in delivery.studies:
            incoming = replace(incoming, association=delivery.key, association_owner=self.owner)
        try:
            outcome = self.store.record_instance(incoming, self.config.storage.duplicates, self.config.study.late_instances)
        except Exception as error:  # the database is down or full: the sender must retry later
            return self._rejected(request, Status.OUT_OF_RESOURCES, f"database write failed: {type(error).__name__}")
        if delivery is not None:
            delivery.studies.add(incoming.study_uid)
        log_event(
            log,
            logging.DEBUG,
            "instance stored",
            outcome=outcome,
            study_uid=incoming.study_uid,
            series_uid=incoming.series_uid,
            sop_instance_uid=incoming.sop_instance_uid,
            calling_ae=request.calling_ae_title,
        )
        return Status.SUCCESS

    def _accept(self, request: StoreRequest) -> IncomingInstance:
        """Read and check the instance, then write it to the spool (not yet recorded)."""
        limits = self.config.receiver.limits
        try:
            dataset = read_instance(request.encoded, limits.max_dataset_bytes)
            check_structure(dataset, limits.max_element_bytes)
            uids = {
                keyword: str(dataset.get(keyword, "") or "").strip()
                for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            }
            facts = dict(
                instance_number=_integer(dataset, "InstanceNumber"),
                modality=_text(dataset, "Modality", 16),
                series_number=_integer(dataset, "SeriesNumber"),
                series_description=_text(dataset, "SeriesDescription"),
                study_date=_text(dataset, "StudyDate", 8),
                study_description=_text(dataset, "StudyDescription"),
            )
        except InstanceRejected:
            raise
        except Exception as error:  # pydicom raises many types for undecodable input
            raise InstanceRejected(Status.CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(error).__name__}: {error}") from None
        for keyword, value in uids.items():
            if not value or not UID(value).is_valid:
                # Without its own SOP UIDs the data is not a DICOM object at all (random bytes
                # parse as garbage elements); without study/series UIDs it misses its IOD's modules.
                status = Status.CANNOT_UNDERSTAND if keyword.startswith("SOP") else Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
                raise InstanceRejected(status, f"{keyword} missing or invalid")
        if uids["SOPInstanceUID"] != request.affected_sop_instance_uid or uids["SOPClassUID"] != request.affected_sop_class_uid:
            raise InstanceRejected(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class/Instance UID differ from the C-STORE request"
            )
        kind = instance_kind(dataset, uids["SOPClassUID"])
        try:
            if kind == InstanceKind.INPUT:
                # Only what a chain may read must be usable; other objects are stored as received
                # and never decoded (a PACS's video or HTJ2K object must not fail a study push).
                check_usable(dataset)
        except InstanceRejected:
            raise
        except Exception as error:  # a value the checks could not even convert
            raise InstanceRejected(Status.CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(error).__name__}") from None
        request.study_uid = uids["StudyInstanceUID"]
        relative = self.spool.instance_path(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
        digest = None
        if self.config.storage.duplicates == "keep-first" and self.spool.exists(relative):
            size = 0  # idempotent: the first copy stays (the path is derived from the UIDs)
        else:
            size = self.spool.write_atomic(relative, request.encoded)
            if self.config.storage.duplicates == "replace":
                # A re-send may replace the instance: its digest tells a real change from a copy.
                digest = hashlib.sha256(request.encoded).hexdigest()
        return IncomingInstance(
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
            path=relative,
            size_bytes=size,
            calling_ae_title=request.calling_ae_title,
            header=lambda: header_summary(dataset),
            kind=kind,
            digest=digest,
            **facts,
        )

    def _rejected(self, request: StoreRequest, status: int, reason: str) -> int:
        try:
            self.store.count("instances_rejected")
        except Exception:  # counting must not turn a clean failure status into an abort
            pass
        log_event(
            log,
            logging.WARNING,
            "instance rejected",
            status=f"0x{status:04X}",
            reason=reason,
            sop_instance_uid=request.affected_sop_instance_uid,
            calling_ae=request.calling_ae_title,
        )
        return status

    # -- server lifecycle ---------------------------------------------------------------------

    def build_ae(self) -> AE:
        settings = self.config.receiver
        ae = AE(ae_title=settings.ae_title)
        ae.supported_contexts = presentation_contexts(settings.accept_any_storage)
        ae.maximum_pdu_size = settings.max_pdu_bytes
        # The gate and GuardedACSE enforce max_associations over established associations;
        # pynetdicom's own count (every acceptor thread) must not reject before them.
        ae.maximum_associations = settings.max_associations + settings.limits.max_pending_connections
        ae.network_timeout = settings.network_timeout_s
        ae.acse_timeout = settings.network_timeout_s
        ae.dimse_timeout = settings.network_timeout_s
        ae.require_calling_aet = self._calling_ae_allowlist()
        return ae

    def start(self) -> GatedAssociationServer:
        """Start listening: the gate's thread accepts, pynetdicom's threads run associations."""
        settings = self.config.receiver
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
        ]
        ae = self.build_ae()
        peer_titles = [peer.ae_title for peer in self.config.peers]
        server = _SharedPortServer(
            ae,
            (settings.bind, settings.port),
            settings.ae_title,
            ae.supported_contexts,
            server_ssl_context(self.config),
            handlers,
            AdmissionPolicy(settings, peer_titles, self.board),
            on_drop=self.connection_dropped,
            on_bad_command=self.bad_command,
        )
        ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"sijnode-gate-{settings.port}", daemon=True).start()
        threading.Thread(target=self._report_drops, name="sijnode-gate-report", daemon=True).start()
        self.server = server
        log_event(
            log, logging.INFO, "receiver listening", ae_title=settings.ae_title, bind=settings.bind, port=settings.port,
            tls=settings.tls.enabled, pid=os.getpid(),
        )
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self._drops_stop.set()
        self._flush_drops()


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """TLS context for the receiver, or None when TLS is off."""
    tls = config.receiver.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(tls.client_ca))
    return context


def receiver_main(config_path: str, index: int, parent_pid: int | None = None, listening: Any = None) -> None:
    """Entry point of an extra receiver process (receiver.processes > 1); SIGTERM stops it.

    It shares the port, the database and the spool with the service's own receiver; every
    guarantee holds per instance, whichever process takes the association.
    """
    from node.checks import config_problems
    from node.config import ConfigError, load_config
    from node.logs import set_levels, setup_logging
    from node.service import reloadable_part
    from node.worker import die_with_parent

    if parent_pid is not None:
        die_with_parent(parent_pid)
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())  # forwarded by the service
    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.format, config.logging.file, config.logging.libraries)
    store = Store(config.database_url)
    spool = Spool(config.storage.data_dir, config.storage.free_space_reserve_mb)
    tempfile.tempdir = str(spool.tmp_dir)
    receiver = Receiver(config, store, spool)
    receiver.start()
    if listening is not None:  # the service waits for this before it listens itself
        listening.send(True)
        listening.close()
    while not stop.wait(0.5):
        if parent_pid is not None and os.getppid() != parent_pid:
            break  # the service is gone
        if reload_requested.is_set():
            reload_requested.clear()
            try:
                new = load_config(config_path)
            except ConfigError:
                continue  # the service validates the same file and logs the refusal; keep running as before
            if config_problems(new):
                continue
            config, _, _ = reloadable_part(config, new)
            receiver.apply_config(config)
            set_levels(config.logging.level, config.logging.libraries)
            # the service's "config reloaded" comes first; this says when this process applies it
            log_event(log, logging.INFO, "config reloaded in a receiver process", pid=os.getpid())
    receiver.stop()
    store.dispose()
