"""The dispatch stage: C-STORE SCU that drains the persistent outbox.

Each delivery is one output object for one destination. A delivery is marked done as soon as
the destination acknowledges it (Success or a Warning status), so an acknowledged object is
never sent to that destination again; failures back off exponentially with jitter until the
delivery's maximum age, then stay failed until ``sijnode retry``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from datetime import timedelta

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from node.config import Config, PeerConfig
from node.logs import log_event
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


def _associate(config: Config, peer: PeerConfig, contexts: list):
    ae = _client_ae(config, peer)
    context = client_ssl_context(peer)
    tls_args = (context, peer.tls.server_hostname or peer.host) if context else None
    return ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title, tls_args=tls_args)


def echo(config: Config, peer: PeerConfig) -> tuple[bool, str]:
    """C-ECHO a peer; returns (ok, description)."""
    assoc = _associate(config, peer, [build_context(Verification)])
    if not assoc.is_established:
        return False, "association rejected, aborted or never connected"
    try:
        status = assoc.send_c_echo()
        if status and status.Status == 0x0000:
            return True, "C-ECHO Success"
        return False, f"C-ECHO status {status.Status:#06x}" if status else "no C-ECHO response"
    finally:
        assoc.release()


def send_batch(config: Config, spool: Spool, store: Store, peer: PeerConfig, batch: list[ClaimedDelivery]) -> int:
    """Send one batch of deliveries to one peer over one association; returns how many were acknowledged."""
    dispatch = config.dispatch
    max_age = timedelta(hours=dispatch.max_age_hours)

    def failed(delivery: ClaimedDelivery, error: str) -> None:
        state = store.delivery_failed(delivery.id, error, dispatch.initial_backoff_s, dispatch.max_backoff_s, max_age)
        log_event(log, logging.WARNING, "delivery failed", destination=peer.name, output_uid=delivery.output_uid, error=error, state=state)

    datasets = []
    for delivery in batch:
        try:
            datasets.append((delivery, dcmread(spool.absolute(delivery.path))))
        except Exception as error:
            failed(delivery, f"cannot read output file: {type(error).__name__}: {error}")
    if not datasets:
        return 0
    contexts = []
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}):
        contexts.append(build_context(sop_class, sorted({syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian})))
    try:
        assoc = _associate(config, peer, contexts)
    except Exception as error:  # e.g. TLS set-up errors
        for delivery, _ in datasets:
            failed(delivery, f"association failed: {type(error).__name__}: {error}")
        return 0
    if not assoc.is_established:
        for delivery, _ in datasets:
            failed(delivery, "association rejected, aborted or never connected")
        return 0
    acknowledged = 0
    try:
        for delivery, dataset in datasets:
            if not assoc.is_established:
                failed(delivery, "association lost")
                continue
            try:
                status = assoc.send_c_store(dataset)
            except Exception as error:
                failed(delivery, f"C-STORE failed: {type(error).__name__}: {error}")
                continue
            code = getattr(status, "Status", None)
            if code in ACKNOWLEDGED_STATUSES:
                store.delivery_succeeded(delivery.id)
                acknowledged += 1
                log_event(log, logging.INFO, "delivered", destination=peer.name, output_uid=delivery.output_uid, status=f"0x{code:04X}")
            else:
                failed(delivery, "no C-STORE response" if code is None else f"C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return acknowledged


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
