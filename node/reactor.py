"""An acceptor association whose reactor waits on its DIMSE queue instead of sleeping 1 ms a loop.

pynetdicom 3.0's ``Association._run_reactor`` sleeps a fixed 1 ms, then looks for a decoded DIMSE
message without blocking; there is no setting for it. On a loaded machine the sleep overshoots
and every C-STORE waits for it: ``bench/reactor_sleep`` measured a bare SCP at 79 images/s stock
against 217 with this loop (bench/README.md). The loop below is pynetdicom's, line for line,
except that it blocks on the message queue for up to 1 ms, so it wakes the moment a message is
queued; release, abort, a dead DUL and the network timeout are still checked every 1 ms.
Hand-written because pynetdicom offers no hook; it relies on pynetdicom 3.0 internals
(``dimse.msg_queue``, ``_reactor_checkpoint``, ``_serve_request``), checked at import.
"""

from __future__ import annotations

import logging
import queue

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider

LOGGER = logging.getLogger("pynetdicom.assoc")
REACTOR_WAIT_SECONDS = 0.001

# The internals the loop below uses; a pynetdicom without them fails here, not mid-association.
assert hasattr(Association, "_serve_request") and hasattr(Association, "_run_reactor")
assert "msg_queue" in DIMSEServiceProvider.__init__.__code__.co_names


class QueueWaitAssociation(Association):
    """``Association`` with the reactor described in the module doc."""

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            # The reactor may be paused while the acceptor sends on its own (pynetdicom's comment).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=REACTOR_WAIT_SECONDS)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                LOGGER.info("Association Aborted")
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
