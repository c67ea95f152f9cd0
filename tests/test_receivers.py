"""Several receiver processes on one port (SO_REUSEPORT), sharing the database and the spool.

The node harness runs two receiver processes in every node test (tests/node_harness.py), so the
kill -9, malformed-input, allowlist and TLS tests cover them; these tests check the sharing itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from storage.models import AssociationStudy, Instance
from tests.node_harness import NODE_AET, REPO, Node, make_mr_series
from tests.peers import LOOPBACK, run_storescu, wait_for


def test_associations_spread_over_receiver_processes_and_a_second_service_is_refused(tmp_path: Path) -> None:
    studies = [make_mr_series(tmp_path / f"study{i}", 2, series_number=i + 1) for i in range(12)]
    with Node(tmp_path / "node", {"workers": {"processes": 0}}) as node:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda files: run_storescu(files, node.port, NODE_AET), studies))
        assert all(result.returncode == 0 for result in results), [r.stderr for r in results if r.returncode]
        assert len(node.rows(Instance)) == 24
        # Each association's row names the process that took it: the kernel spread them.
        owners = {row.owner for row in node.rows(AssociationStudy)}
        assert len(owners) == 2, owners
        assert {str(dcmread(files[0]).StudyInstanceUID) for files in studies} == {row.study_uid for row in node.rows(AssociationStudy)}

        # A second service with the same port (other data) must not share the traffic.
        second = Node(tmp_path / "second", {"receiver": {"port": node.port}, "workers": {"processes": 0}})
        refused = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(second.config_path), "serve"],
            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
        )
        assert refused.returncode != 0
        assert f"another sijnode service listens on port {node.port}" in refused.stderr + refused.stdout


def test_the_peer_sends_pdus_as_large_as_it_allows_and_the_node_stores_them(tmp_path: Path) -> None:
    """The node announces ``receiver.max_pdu_bytes`` in its A-ASSOCIATE-AC: dcmtk's storescu,
    proposing its largest --max-pdu, sees that value; a pynetdicom SCU, which has no send limit
    of its own, sends PDUs as large as the node allows (larger than dcmtk's 128 KiB), here
    configured to 4 MiB: a 2 MiB image in one PDU. Both images arrive whole."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage

    from node.config import ReceiverConfig

    assert ReceiverConfig().max_pdu_bytes == 262144
    announced = 4 << 20
    files = make_mr_series(tmp_path / "study", 2, size=1024)  # 2 MiB of pixel data each
    with Node(tmp_path / "node", {"receiver": {"max_pdu_bytes": announced}, "workers": {"processes": 0}}) as node:
        sent = run_storescu(files[:1], node.port, NODE_AET, extra_args=["-d", "--max-pdu", "131072"])
        assert sent.returncode == 0, sent.stderr
        output = sent.stdout + sent.stderr
        assert re.search(rf"Their Max PDU Receive Size:\s+{announced}\b", output), output[-3000:]
        assert re.search(r"Our Max PDU Receive Size:\s+131072\b", output)

        pdu_sizes: list[int] = []
        scu = AE(ae_title="STORESCU")
        scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_PDU_SENT, lambda event: pdu_sizes.append(len(event.pdu.encode())) if event.pdu.pdu_type == 0x04 else None)]
        assoc = scu.associate(LOOPBACK, node.port, ae_title=NODE_AET, evt_handlers=handlers)
        assert assoc.is_established and assoc.acceptor.maximum_length == announced
        status = assoc.send_c_store(dcmread(files[1]))
        assoc.release()
        assert status.Status == 0x0000
        assert max(pdu_sizes) > 2 * 1024 * 1024, pdu_sizes  # the whole dataset in one P-DATA PDU

        rows = {row.sop_instance_uid: row for row in node.rows(Instance)}
        for path in files:
            original = dcmread(path)
            stored = dcmread(node.workdir / "var" / "spool" / rows[str(original.SOPInstanceUID)].path)
            assert stored.PixelData == original.PixelData


def test_association_slots_are_counted_over_all_receiver_processes(tmp_path: Path) -> None:
    """receiver.max_associations bounds the node, not each of its receiver processes: with 2
    processes and 2 slots, 6 association requests get 2 associations (the kernel spreads the
    connections over both processes), and released slots are free again."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    overrides = {
        "receiver": {"max_associations": 2, "limits": {"reserved_peer_associations": 0, "max_associations_per_source": 8}},
        "workers": {"processes": 0},
    }
    with Node(tmp_path / "node", overrides) as node:
        scu = AE(ae_title="ECHOSCU")
        scu.add_requested_context(Verification)
        attempts = [scu.associate(LOOPBACK, node.port, ae_title=NODE_AET) for _ in range(6)]
        established = [assoc for assoc in attempts if assoc.is_established]
        try:
            assert len(established) == 2, [assoc.is_rejected for assoc in attempts]
            assert all(assoc.is_rejected for assoc in attempts if not assoc.is_established)
            wait_for(lambda: node.log_path.read_text().count("all association slots are taken") == 4, timeout=30, what="4 rejections logged")
            board = json.loads((node.workdir / "var" / "receiver-slots.json").read_text())
            assert sum(len(addresses) for addresses in board.values()) == 2, board
        finally:
            for assoc in established:
                assoc.release()

        def two_fit() -> bool:
            again = [scu.associate(LOOPBACK, node.port, ae_title=NODE_AET) for _ in range(2)]
            accepted = [assoc.is_established for assoc in again]
            for assoc in again:
                if assoc.is_established:
                    assoc.release()
            return all(accepted)

        wait_for(two_fit, timeout=10, interval=0.5, what="released slots free again")


def test_slots_of_a_killed_receiver_process_free_and_its_lock_goes_with_it(tmp_path: Path) -> None:
    """A receiver process killed with -9 while it holds the slot board's lock neither keeps its
    slots nor blocks the other processes' admissions."""
    import signal
    import textwrap
    import threading

    from node.slots import SlotBoard

    path = tmp_path / "receiver-slots.json"
    holder = textwrap.dedent(
        f"""
        import threading, time
        from pathlib import Path
        from node.slots import SlotBoard
        board = SlotBoard(Path({str(path)!r}))
        assert board.admit(threading.current_thread(), "10.0.0.7", lambda taken: None) is None
        with board._changing():
            print("holding", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], cwd=REPO, env={"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "holding"
        assert json.loads(path.read_text()) == {str(process.pid): ["10.0.0.7"]}
        board = SlotBoard(path)
        seen: list[list[str]] = []
        waiter = threading.Thread(target=board.admit, args=(threading.current_thread(), "10.0.0.9", lambda taken: seen.append(taken)), daemon=True)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not seen, "the board's lock is held by the other process"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        waiter.join(10)
        assert not waiter.is_alive() and len(seen) == 1  # the lock went with the process
        board.admit("another", "10.0.0.10", lambda taken: seen.append(taken))
        assert seen[-1] == ["10.0.0.9"], seen  # and so did its slot
    finally:
        process.kill()
        process.wait()
