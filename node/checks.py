"""Checks of what config.yaml names beyond its own syntax: model packs and TLS files.

Shared by ``sijnode serve`` (refuses to start), ``sijnode config check``, ``sijnode packs`` and
the service's reload (refuses the new config), so each says the same thing.
"""

from __future__ import annotations

from pathlib import Path

from node.config import Config


def pack_problem(folder: str | Path) -> str | None:
    """What is wrong with the pack in ``folder`` (missing folder, bad manifest, sha256 mismatch), or None."""
    from pipeline.packs import PackError, load_pack

    if not Path(folder).is_dir():
        return f"the pack folder {folder} does not exist"
    try:
        load_pack(folder).verify()
    except PackError as error:
        return str(error)
    return None


def pack_problems(config: Config) -> list[str]:
    """Each enabled chain's pack must exist, have a valid manifest and match its sha256."""
    return [
        f"chains[{chain.name}].pack: {problem}"
        for chain in config.chains
        if chain.enabled and chain.pack and (problem := pack_problem(chain.pack))
    ]


def file_problems(config: Config) -> list[str]:
    """Files the config names that must exist (TLS certificates and keys)."""
    problems = []
    tls = config.receiver.tls
    for key, path in (("certificate", tls.certificate), ("private_key", tls.private_key), ("client_ca", tls.client_ca)):
        if tls.enabled and path and not path.exists():
            problems.append(f"receiver.tls.{key}: {path} does not exist")
    for peer in config.peers:
        for key, path in (("ca", peer.tls.ca), ("certificate", peer.tls.certificate), ("private_key", peer.tls.private_key)):
            if peer.tls.enabled and path and not path.exists():
                problems.append(f"peers[{peer.name}].tls.{key}: {path} does not exist")
    return problems


def config_problems(config: Config) -> list[str]:
    """Everything that keeps a syntactically valid config from running."""
    return pack_problems(config) + file_problems(config)
