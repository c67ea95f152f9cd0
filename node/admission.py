"""Who gets into the receiver, and for how long: slow, silent and hostile peers cannot starve others.

pynetdicom's server gives every accepted connection its own association threads at once, does
the TLS handshake on the accept path (one silent TLS client blocks every other), waits for the
A-ASSOCIATE-RQ only by an idle timeout (a peer sending one byte at a time holds its slot for
ever) and counts connections that never negotiate against ``maximum_associations``. It has no
per-address limit, no reserved slots and no per-PDU deadline. So the receiver runs its own
front end, hand-written here because pynetdicom lacks it:

``GatedAssociationServer``
    One thread accepts connections and holds them in a selector until their whole
    A-ASSOCIATE-RQ has arrived (TLS handshake included, non-blocking), each with a deadline
    (``association_request_timeout_s``, ``tls_handshake_timeout_s``). Waiting connections cost
    a socket, no thread; when too many wait (in all or from one address) the oldest is closed.
    Only then does a connection become a pynetdicom association, with the bytes already read.
``GuardedSocket``
    Every PDU, once started, must arrive whole within ``pdu_timeout_s``, and no PDU may be
    larger than the receiver allows; otherwise the connection closes.
``GuardedACSE``
    Rejects with the proper A-ASSOCIATE-RJ: source address not allowed, called AE title not
    the node's, and slots: ``max_associations`` established at once, the last
    ``reserved_peer_associations`` only for configured peers, ``max_associations_per_source``
    per address for everyone else; counted over all receiver processes of the node (node/slots.py).
``GuardedDIMSE``
    Stops keeping a dataset's bytes once it passes ``max_dataset_bytes`` (the rest is read and
    dropped) and answers its C-STORE with a failure status; a command set whose UIDs
    pynetdicom cannot take (longer than 64 characters) gets a failure response, not an abort.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.utils import make_target
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.config import ReceiverConfig, ReceiverLimits
from node.slots import SlotBoard

log = logging.getLogger("sijnode.admission")

_A_ASSOCIATE_RQ = 0x01
# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_ADDRESS = (0x01, 0x01, 0x01)  # PS3.8 has no reason for an address: no-reason-given
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation-related, local limit exceeded


# -- the policy the ACSE applies ----------------------------------------------------------------


class AdmissionPolicy:
    """Address allowlist, called AE titles and association slots, from the receiver config."""

    def __init__(self, settings: ReceiverConfig, peer_ae_titles: list[str], board: SlotBoard | None = None) -> None:
        self.limits: ReceiverLimits = settings.limits
        self.max_associations = settings.max_associations
        self.called_ae_titles = frozenset(settings.answered_called_ae_titles)
        self.peer_ae_titles = frozenset(peer_ae_titles)
        # Parsed once; config validation already refused anything that is not a network.
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in settings.allowed_source_addresses]
        # Where slots are counted: node-wide across receiver processes (node/slots.py), or this process.
        self.board = board if board is not None else SlotBoard(None)

    def address_allowed(self, address: str) -> bool:
        """Whether a peer address is within the source allowlist (empty list: any address)."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def slot_refusal(self, calling_ae: str, address: str, established: list[str]) -> str | None:
        """Why an association may not be established now (None: it may); ``established``: the
        source addresses of the associations established now."""
        is_peer = calling_ae in self.peer_ae_titles
        if len(established) >= self.max_associations:
            return "all association slots are taken"
        if not is_peer and len(established) >= self.max_associations - self.limits.reserved_peer_associations:
            return "the remaining association slots are reserved for configured peers"
        if not is_peer:
            same_source = sum(1 for a in established if a == address)
            if same_source >= self.limits.max_associations_per_source:
                return "too many associations from this address"
        return None


class GuardedACSE(ACSE):
    """pynetdicom's acceptor negotiation, after the node's own checks (see the module doc)."""

    def __init__(self, assoc: Association, policy: AdmissionPolicy) -> None:
        super().__init__(assoc)
        self.policy = policy
        self.rejection: str | None = None  # why this association was rejected, for EVT_REJECTED

    def _reject(self, reason: str, rsd: tuple[int, int, int]) -> None:
        self.rejection = reason
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _negotiate_as_acceptor(self) -> None:
        primitive = self.requestor.primitive
        self.requestor.ae_title = primitive.calling_ae_title
        address = self.assoc.requestor.address
        if not self.policy.address_allowed(address):
            return self._reject("source address not allowed", REJECT_ADDRESS)
        if str(primitive.called_ae_title).strip() not in self.policy.called_ae_titles:
            return self._reject("called AE title not recognized", REJECT_CALLED_AE)
        required = [title.strip() for title in self.assoc.ae.require_calling_aet]
        if required and str(primitive.calling_ae_title).strip() not in required:
            return self._reject("calling AE title not recognized", REJECT_CALLING_AE)
        # The slot is taken before the association is accepted, counted node-wide (node/slots.py):
        # two requests cannot both take the last slot, whichever receiver processes they reach.
        calling_ae = str(primitive.calling_ae_title).strip()
        board = self.policy.board
        refusal = board.admit(self.assoc, address, lambda taken: self.policy.slot_refusal(calling_ae, address, taken))
        if refusal is not None:
            return self._reject(refusal, REJECT_LOCAL_LIMIT)
        try:
            super()._negotiate_as_acceptor()
        finally:
            if not self.assoc.is_established:  # rejected or aborted during negotiation
                board.release(self.assoc)


# -- the transport: per-PDU deadline and size limit ---------------------------------------------


class GuardedSocket(AssociationSocket):
    """An AssociationSocket whose reads have a per-PDU deadline and a size limit.

    pynetdicom reads a PDU as recv(6) (type and length) then recv(length), blocking until all
    has come. Here the header read starts the PDU's clock and both reads must finish before
    it runs out. ``prefix`` holds bytes the gate already read (the A-ASSOCIATE-RQ).
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, prefix: bytes, pdu_timeout_s: float, max_pdu_bytes: int) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._prefix = bytearray(prefix)
        self.pdu_timeout_s = pdu_timeout_s
        self.max_pdu_bytes = max_pdu_bytes
        self._deadline = 0.0
        client_socket.settimeout(pdu_timeout_s)  # sends are bounded the same way

    @property
    def ready(self) -> bool:
        return bool(self._prefix) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes == 6:  # a PDU header: a new PDU starts
            self._deadline = time.monotonic() + self.pdu_timeout_s
        elif nr_bytes > self.max_pdu_bytes:
            raise OSError(f"PDU of {nr_bytes} bytes is larger than the receiver allows ({self.max_pdu_bytes})")
        data = bytearray(self._prefix[:nr_bytes])
        del self._prefix[: len(data)]
        sock = self.socket
        while len(data) < nr_bytes and sock is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"PDU not complete within {self.pdu_timeout_s:g} s")
            sock.settimeout(remaining)
            chunk = sock.recv(min(65536, nr_bytes - len(data)))
            if not chunk:
                break  # closed by the peer: pynetdicom sees a short read
            data.extend(chunk)
        if sock is not None:
            sock.settimeout(self.pdu_timeout_s)
        return data


# -- the DIMSE layer: dataset size cap and bad command sets ---------------------------------------


class OversizedDataset(io.BytesIO):
    """Stands in for a dataset that passed the size cap: counts its bytes, keeps none."""

    def __init__(self, kept: int, limit: int) -> None:
        super().__init__()
        self.size = kept
        self.limit = limit

    def write(self, data: Any) -> int:
        self.size += len(data)
        return len(data)


class GuardedDIMSE(DIMSEServiceProvider):
    """DIMSE message assembly with a cap on the dataset size and failure answers for bad commands."""

    def __init__(self, assoc: Association, max_dataset_bytes: int, on_bad_command: Callable[[str], None]) -> None:
        super().__init__(assoc)
        self.max_dataset_bytes = max_dataset_bytes
        self.on_bad_command = on_bad_command

    def receive_primitive(self, primitive: Any) -> None:
        """pynetdicom's own ``receive_primitive`` (3.0), with the two guards added."""
        if self.message is None:
            self.message = DIMSEMessage()
        message = self.message
        if not isinstance(message.data_set, OversizedDataset):
            incoming = sum(len(data) - 1 for _, data in primitive.presentation_data_value_list if not data[0] & 1)
            held = message.data_set.tell() if hasattr(message.data_set, "tell") else 0
            if incoming and held + incoming > self.max_dataset_bytes:
                message.data_set = OversizedDataset(held, self.max_dataset_bytes)  # memory stops growing here
        if not message.decode_msg(primitive, self.assoc):
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = message.context_id
        self.message = None  # the next P-DATA starts a new message
        try:
            request = message.message_to_primitive()
        except Exception as error:
            if not self._answer_bad_store(message, error):
                log.warning("invalid DIMSE message: %s", type(error).__name__)
                self.dul.event_queue.put("Evt19")  # as pynetdicom: the association ends
            return
        if isinstance(request, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[request.MessageIDBeingRespondedTo] = request
        elif isinstance(request, N_EVENT_REPORT) and request.is_valid_request:
            threading.Thread(target=make_target(self.assoc._serve_request), args=(request, context_id)).start()
        else:
            self.msg_queue.put((context_id, request))

    def _answer_bad_store(self, message: DIMSEMessage, error: Exception) -> bool:
        """A C-STORE-RQ whose command set pynetdicom cannot turn into a request: answer 0xC210."""
        command = getattr(message, "command_set", None)
        if command is None or getattr(command, "CommandField", None) != 0x0001:
            return False
        response = C_STORE()
        response.MessageIDBeingRespondedTo = int(command.MessageID)
        sop_class = str(command.get("AffectedSOPClassUID", "")).strip("\x00 ")
        if 0 < len(sop_class) <= 64:
            response.AffectedSOPClassUID = sop_class
        response.Status = 0xC210
        self.on_bad_command(f"C-STORE command set not valid: {type(error).__name__}")
        self.send_msg(response, message.context_id)
        return True


# -- the front end: accept, TLS handshake and A-ASSOCIATE-RQ off the association threads ----------


@dataclass(eq=False)
class _Waiting:
    """An accepted connection whose A-ASSOCIATE-RQ is not complete yet."""

    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    handshaking: bool
    received: bytearray = field(default_factory=bytearray)


class _GatedRequestHandler(RequestHandler):
    """pynetdicom's RequestHandler, building the association with the guarded parts."""

    def _create_association(self) -> Association:
        server: GatedAssociationServer = self.server  # type: ignore[assignment]
        sock, prefix = self.request
        self.request = sock
        assoc = server.association_class(self.ae, "acceptor")
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(GuardedSocket(assoc, sock, prefix, server.limits.pdu_timeout_s, server.max_pdu_read))
        assoc.acse = GuardedACSE(assoc, server.policy)
        assoc.dimse = GuardedDIMSE(assoc, server.limits.max_dataset_bytes, server.on_bad_command)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = [*server.contexts]
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's association server with the gate in front (see the module doc).

    ``serve_forever`` is replaced by the gate's selector loop: it accepts, handshakes and reads
    each connection's A-ASSOCIATE-RQ without blocking, and hands a connection to pynetdicom only
    once that request is complete. ``on_drop(reason, address)`` hears of each connection closed
    before that.
    """

    association_class: type[Association] = Association

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: list,
        ssl_context: ssl.SSLContext | None,
        evt_handlers: list,
        policy: AdmissionPolicy,
        on_drop: Callable[[str, str], None],
        on_bad_command: Callable[[str], None],
    ) -> None:
        # socketserver's default backlog of 5 makes a burst of connections wait for SYN retries
        # (1 s, 3 s, 7 s...) before the gate even sees them; the kernel caps this at somaxconn.
        self.request_queue_size = 1024
        self.policy = policy
        self.limits = policy.limits
        self.on_drop = on_drop
        self.on_bad_command = on_bad_command
        # A P-DATA PDU may be as large as the receiver's maximum (0: unlimited, then one dataset).
        self.max_pdu_read = max(ae.maximum_pdu_size or self.limits.max_dataset_bytes, self.limits.max_association_request_bytes)
        self._gate_ssl = ssl_context
        self._waiting: OrderedDict[socket.socket, _Waiting] = OrderedDict()
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers, _GatedRequestHandler)
        self.socket.setblocking(False)

    # The listening socket is non-blocking; accepted ones are handled by the gate.
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._selector.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                timeout = min(0.5, max(0.0, self._next_deadline() - time.monotonic()))
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self.socket:
                        self._accept_some()
                    else:
                        self._advance(self._waiting.get(key.fileobj))
                self._expire()
        finally:
            for waiting in list(self._waiting.values()):
                self._close(waiting)
            self._selector.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait(5)
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print the traceback to stderr: log it (redacted) instead.
        log.exception("error handling a connection")

    # -- the gate ------------------------------------------------------------------------------

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def _next_deadline(self) -> float:
        return min((w.deadline for w in self._waiting.values()), default=time.monotonic() + 0.5)

    def _accept_some(self) -> None:
        for _ in range(64):  # bounded, so expiry still runs under a connection flood
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("accept failed: %s", error.strerror or error)
                return
            self._make_room(address[0])
            sock.setblocking(False)
            now = time.monotonic()
            deadline = now + self.limits.association_request_timeout_s
            handshaking = self._gate_ssl is not None
            if handshaking:
                deadline = min(deadline, now + self.limits.tls_handshake_timeout_s)
                try:
                    sock = self._gate_ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as error:
                    self.on_drop(f"TLS setup failed: {type(error).__name__}", address[0])
                    sock.close()
                    continue
            waiting = _Waiting(sock, address, deadline, handshaking)
            self._waiting[sock] = waiting
            self._selector.register(sock, selectors.EVENT_READ)
            self._advance(waiting)

    def _make_room(self, source: str) -> None:
        """Close the oldest waiting connection(s) so that a new one fits the limits."""
        same_source = [w for w in self._waiting.values() if w.address[0] == source]
        if len(same_source) >= self.limits.max_pending_per_source:
            self._close(same_source[0], "too many connections waiting from this address: oldest closed")
        if len(self._waiting) >= self.limits.max_pending_connections:
            self._close(next(iter(self._waiting.values())), "too many connections waiting: oldest closed")

    def _expire(self) -> None:
        now = time.monotonic()
        for waiting in [w for w in self._waiting.values() if w.deadline <= now]:
            what = "TLS handshake" if waiting.handshaking else "association request"
            self._close(waiting, f"{what} not complete in time")

    def _close(self, waiting: _Waiting, reason: str | None = None) -> None:
        self._waiting.pop(waiting.sock, None)
        try:
            self._selector.unregister(waiting.sock)
        except (KeyError, ValueError):
            pass
        try:
            waiting.sock.close()
        except OSError:
            pass
        if reason is not None:
            self.on_drop(reason, waiting.address[0])

    def _advance(self, waiting: _Waiting | None) -> None:
        """Move one waiting connection on: handshake, read, hand over, or close."""
        if waiting is None:
            return
        sock = waiting.sock
        try:
            if waiting.handshaking:
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    self._selector.modify(sock, selectors.EVENT_READ)
                    return
                except ssl.SSLWantWriteError:
                    self._selector.modify(sock, selectors.EVENT_WRITE)
                    return
                waiting.handshaking = False
                waiting.deadline = min(waiting.deadline, time.monotonic() + self.limits.association_request_timeout_s)
                self._selector.modify(sock, selectors.EVENT_READ)
            while True:
                needed = self._bytes_needed(waiting.received)
                if needed is None:
                    return self._close(waiting, "association request larger than allowed")
                if needed == 0:
                    return self._hand_over(waiting)
                try:
                    chunk = sock.recv(needed)
                except (ssl.SSLWantReadError, BlockingIOError):
                    return
                if not chunk:
                    return self._close(waiting, "closed before its association request" if waiting.received else None)
                waiting.received.extend(chunk)
        except ssl.SSLError as error:
            self._close(waiting, f"TLS handshake failed: {error.reason or type(error).__name__}")
        except OSError as error:
            self._close(waiting, f"connection error: {error.strerror or type(error).__name__}")

    def _bytes_needed(self, received: bytearray) -> int | None:
        """Bytes still missing from the first PDU (0: complete; None: too large to be a request)."""
        if len(received) < 6:
            return 6 - len(received)
        pdu_type, _, length = struct.unpack(">BBL", bytes(received[:6]))
        if pdu_type != _A_ASSOCIATE_RQ:
            return 0  # not a request: pynetdicom answers it as the state machine says
        if length + 6 > self.limits.max_association_request_bytes:
            return None
        return length + 6 - len(received)

    def _hand_over(self, waiting: _Waiting) -> None:
        """The request is complete: the connection becomes a pynetdicom association."""
        self._waiting.pop(waiting.sock, None)
        self._selector.unregister(waiting.sock)
        waiting.sock.setblocking(True)
        try:
            self.finish_request((waiting.sock, bytes(waiting.received)), waiting.address)
        except Exception:
            self.handle_error(waiting.sock, waiting.address)
            self.shutdown_request(waiting.sock)
