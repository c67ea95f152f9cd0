"""The dispatch stage: C-STORE SCU that drains the persistent outbox.

Each delivery is one output object for one destination. A delivery is marked done as soon as
the destination acknowledges it (Success or a Warning status), so an acknowledged object is
never sent to that destination again; failures back off exponentially with jitter until the
delivery's maximum age, then stay failed until ``sijnode retry``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections import defaultdict
from datetime import timedelta

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import Verification
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from node import metrics
from node.config import Config, PeerConfig
from node.logs import log_event
from node.uids import short_uid
from storage.models import DeliveryState
from storage.spool import Spool
from storage.store import ClaimedDelivery, Store

log = logging.getLogger("sijnode.sender")

# PS3.4 B.2.3: warnings mean the object was stored.
ACKNOWLEDGED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def client_ssl_context(peer: PeerConfig) -> ssl.SSLContext | None:
    """TLS context towards a peer, or None when TLS is off."""
    if not peer.tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(peer.tls.ca) if peer.tls.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if peer.tls.certificate and peer.tls.private_key:
        context.load_cert_chain(str(peer.tls.certificate), str(peer.tls.private_key))
    return context


def _client_ae(config: Config, peer: PeerConfig) -> AE:
    ae = AE(ae_title=config.receiver.ae_title)
    ae.network_timeout = config.dispatch.network_timeout_s
    ae.acse_timeout = config.dispatch.network_timeout_s
    ae.dimse_timeout = config.dispatch.network_timeout_s
    return ae


class AssociationFailure(Exception):
    """No association with a peer; ``reason`` is one word for metrics, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _associate(config: Config, peer: PeerConfig, contexts: list):
    """An established association with ``peer``, or AssociationFailure saying why in words."""
    ae = _client_ae(config, peer)
    context = client_ssl_context(peer)
    tls_args = (context, peer.tls.server_hostname or peer.host) if context else None
    rejection: list[str] = []

    def on_acse_received(event: evt.Event) -> None:
        # pynetdicom only logs why it was rejected; keep the reason for the delivery's error.
        primitive = getattr(event, "primitive", None)
        if getattr(primitive, "result", None) in (0x01, 0x02):
            rejection.append(f"{primitive.reason_str} ({primitive.result_str.lower()})")

    try:
        assoc = ae.associate(
            peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title, tls_args=tls_args,
            evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_received)],
        )
    except Exception as error:  # e.g. TLS set-up errors
        raise AssociationFailure("error", f"association failed: {type(error).__name__}: {error}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise AssociationFailure("rejected", "association rejected: " + (rejection[0] if rejection else "no reason given"))
    raise _connection_failure(peer, config.dispatch.network_timeout_s)


def _connection_failure(peer: PeerConfig, timeout: float) -> AssociationFailure:
    """Why an association neither came up nor was rejected: pynetdicom logs the socket error but
    keeps nothing of it, so a plain TCP connect tells refused, timed out and unreachable apart."""
    where = f"{peer.host}:{peer.port}"
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return AssociationFailure("refused", f"connection refused by {where}")
    except TimeoutError:
        return AssociationFailure("timeout", f"timeout connecting to {where}")
    except OSError as error:
        return AssociationFailure("unreachable", f"cannot connect to {where}: {error.strerror or error}")
    return AssociationFailure("aborted", f"association aborted or timed out at {where} (no A-ASSOCIATE answer)")


def status_words(code: int) -> str:
    """``0xA700 (Refused: Out of Resources)``: the code with the standard's meaning."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    return f"0x{code:04X}" + (f" ({meaning})" if meaning else "")


def echo(config: Config, peer: PeerConfig) -> tuple[bool, str]:
    """C-ECHO a peer; returns (ok, description)."""
    try:
        assoc = _associate(config, peer, [build_context(Verification)])
    except AssociationFailure as failure:
        return False, str(failure)
    try:
        status = assoc.send_c_echo()
        if status and status.Status == 0x0000:
            return True, "C-ECHO Success"
        return False, f"C-ECHO status {status.Status:#06x}" if status else "no C-ECHO response (timeout or aborted)"
    finally:
        if assoc.is_established:
            assoc.release()


class _Batch:
    """One batch of deliveries to one peer over one association, logged as one line per study:
    delivered N objects, or failed N and why."""

    def __init__(self, config: Config, spool: Spool, store: Store, peer: PeerConfig) -> None:
        self.config = config
        self.spool = spool
        self.store = store
        self.peer = peer
        self.delivered: dict[str, int] = defaultdict(int)
        self.failures: dict[str, list[tuple[str, str]]] = defaultdict(list)  # study -> (error, state)

    def succeeded(self, delivery: ClaimedDelivery) -> None:
        self.store.delivery_succeeded(delivery.id)
        metrics.delivery_attempted(self.peer.name)
        self.delivered[delivery.study_uid] += 1

    def failed(self, delivery: ClaimedDelivery, reason: str, error: str) -> None:
        dispatch = self.config.dispatch
        max_age = timedelta(hours=dispatch.max_age_hours)
        state = self.store.delivery_failed(delivery.id, error, dispatch.initial_backoff_s, dispatch.max_backoff_s, max_age)
        metrics.delivery_attempted(self.peer.name, reason)
        self.failures[delivery.study_uid].append((error, state))

    def send(self, batch: list[ClaimedDelivery]) -> int:
        datasets = []
        for delivery in batch:
            try:
                datasets.append((delivery, dcmread(self.spool.absolute(delivery.path))))
            except Exception as error:
                self.failed(delivery, "unreadable", f"cannot read output file: {type(error).__name__}: {error}")
        if not datasets:
            return 0
        contexts = []
        for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}):
            contexts.append(build_context(sop_class, sorted({syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian})))
        try:
            assoc = _associate(self.config, self.peer, contexts)
        except AssociationFailure as failure:
            for delivery, _ in datasets:
                self.failed(delivery, failure.reason, str(failure))
            return 0
        acknowledged = 0
        try:
            for delivery, dataset in datasets:
                if not assoc.is_established:
                    self.failed(delivery, "aborted", "association lost before this object was sent")
                    continue
                try:
                    status = assoc.send_c_store(dataset)
                except Exception as error:
                    self.failed(delivery, "error", f"C-STORE failed: {type(error).__name__}: {error}")
                    continue
                code = getattr(status, "Status", None)
                if code in ACKNOWLEDGED_STATUSES:
                    self.succeeded(delivery)
                    acknowledged += 1
                elif code is None:
                    self.failed(delivery, "timeout", "no C-STORE response (timeout or association aborted)")
                else:
                    self.failed(delivery, "status", f"C-STORE failure status {status_words(code)}")
        finally:
            if assoc.is_established:
                assoc.release()
        return acknowledged

    def log(self) -> None:
        name = self.peer.name
        for study_uid, count in self.delivered.items():
            log_event(log, logging.INFO, f"delivery done: study {short_uid(study_uid)} to {name}", study_uid=study_uid, destination=name, objects=count)
        for study_uid, outcomes in self.failures.items():
            error, state = outcomes[-1]
            gave_up = state == DeliveryState.FAILED
            log_event(
                log,
                logging.ERROR if gave_up else logging.WARNING,
                f"delivery failed: study {short_uid(study_uid)} to {name}: {error}"
                + ("; gave up (sijnode retry re-queues)" if gave_up else "; will retry"),
                study_uid=study_uid,
                destination=name,
                objects=len(outcomes),
                state=state,
            )


def send_batch(config: Config, spool: Spool, store: Store, peer: PeerConfig, batch: list[ClaimedDelivery]) -> int:
    """Send one batch of deliveries to one peer over one association; returns how many were acknowledged."""
    sending = _Batch(config, spool, store, peer)
    try:
        return sending.send(batch)
    finally:
        sending.log()


class Sender:
    """Background thread that drains the outbox for every destination."""

    def __init__(self, config: Config, store: Store, spool: Spool, poll_seconds: float = 1.0) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def drain_once(self) -> int:
        """Send what is due now to every destination; returns how many were acknowledged."""
        sent = 0
        lease_seconds = self.config.dispatch.network_timeout_s * (self.config.dispatch.batch_size + 2)
        for peer in self.config.destinations:
            batch = self.store.claim_deliveries(peer.name, self.config.dispatch.batch_size, lease_seconds)
            if batch:
                sent += send_batch(self.config, self.spool, self.store, peer, batch)
        return sent

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.drain_once() > 0
            except Exception:
                log.exception("sender loop error")
                busy = False
            if not busy:
                self._stop.wait(self.poll_seconds)
