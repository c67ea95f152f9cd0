"""README.md's "Try it" block, run as written, in order, against a node started with the shipped
config.yaml by the README's own set-up command. The commands are parsed from README.md, never
copied here, so the README cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.peers import dicom_tool_env, run_echoscu, wait_for

REPO = Path(__file__).resolve().parent.parent
TRY_IT = "### Try it with a synthetic study"


def fenced_blocks(markdown: str, heading: str) -> list[str]:
    """The ```sh blocks between the heading starting with ``heading`` and the next heading."""
    blocks: list[str] = []
    inside = fence = collecting = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
            collecting = fence and inside and line.strip() == "```sh"
            if collecting:
                blocks.append("")
        elif collecting:
            blocks[-1] += line + "\n"
        elif not fence and line.startswith("#"):
            inside = line.startswith(heading)
    return blocks


def commands(block: str) -> list[str]:
    """Each command line of a shell block (comments and blank lines dropped)."""
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def serve_command(markdown: str) -> str:
    """The set-up step that starts the node on the shipped config, as the README writes it."""
    for block in fenced_blocks(markdown, "## Set-up"):
        for line in commands(block):
            for part in line.split("&&"):
                if re.search(r"\bsijnode\b.*\bserve\b", part):
                    return part.strip()
    raise AssertionError("README's set-up starts no `sijnode ... serve`")


def test_readme_try_it_runs_as_written(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    [block] = fenced_blocks(readme, TRY_IT)
    steps = commands(block)
    assert any("storescu" in step for step in steps) and steps[-1].startswith("sijnode results")

    # A fresh checkout: the shipped config.yaml and packs, nothing else (no var/, no phantoms).
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(REPO / "config.yaml", checkout / "config.yaml")
    (checkout / "packs").symlink_to(REPO / "packs")
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    port, metrics_port = shipped["receiver"]["port"], shipped["metrics"]["port"]
    # `sijnode` as the installed console script would run it, from this worktree's code.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sijnode").write_text(f"#!/bin/sh\nexec {sys.executable} -m node.cli \"$@\"\n")
    (bin_dir / "sijnode").chmod(0o755)
    env = dict(dicom_tool_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO), COLUMNS="80")
    env.pop("SIJNODE_CONFIG", None)

    assert run_echoscu(port, "SIJNODE", timeout=10).returncode != 0, f"port {port} is taken: the README's node needs it"
    node = subprocess.Popen(
        serve_command(readme), shell=True, cwd=checkout, env=env, start_new_session=True,
        stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: node.poll() is None and run_echoscu(port, "SIJNODE", timeout=10).returncode == 0, timeout=120, what="the node to answer")
        outputs = []
        for step in steps:
            result = subprocess.run(step, shell=True, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"README step failed: {step}\n{result.stdout}\n{result.stderr}"
            outputs.append(result.stdout)
        assert json.loads(outputs[[i for i, s in enumerate(steps) if "/health" in s][0]])["status"] == "ready"

        # "Run sijnode results again until its findings show": the README's last step, as written.  No PACS listens
        # at the shipped peer's address, so once the dispatcher has tried (the objects are "queued" for a moment
        # after the job is done), every object waits for its next retry, in words.
        delivery_in_words = r"retry (in \d+s|now), \d+ tries: |sending now|delivered"

        def findings_shown() -> str | None:
            text = subprocess.run(steps[-1], shell=True, cwd=checkout, env=env, capture_output=True, text=True, timeout=120).stdout
            return text if "decision" in text and re.search(delivery_in_words, " ".join(text.split())) else None

        results = wait_for(findings_shown, timeout=240, interval=3, what="findings and delivery attempts in `sijnode results`")
        assert "xr-anatomy: job 1 done" in results and "DEMONSTRATION" in results
        assert re.search(r"Radiographic sacroiliitis.*\s0\.\d{3}\s+0\.59\s+(Present|Absent)", " ".join(results.split())), results
        for line in results.splitlines():
            assert len(line) <= 80, line
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert 'sijnode_jobs{state="done"} 1.0' in response.read().decode()
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        time.sleep(0.1)
