"""The node's configuration: config.yaml validated by pydantic at start.

An invalid file is reported key by key (``ConfigError``) and the command exits non-zero.
Relative paths in the file are resolved against the file's own folder, so the shipped
config.yaml works from any working directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.classify import DEFAULT_TILT_TOLERANCE_DEG, ClassificationRule, check_rule_names
from pipeline.route import DEFAULT_SERIES_BASE, SERIES_BLOCK, ChainSpec


class _Strict(BaseModel):
    # A misspelt key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ][\x20-\x5b\x5d-\x7e]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class TLSServerConfig(_Strict):
    """DICOM TLS for the receiver (PS3.15 Annex B)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    # When set, clients must present a certificate signed by one of these CAs.
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TLSServerConfig":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs certificate and private_key")
        return self


class TLSClientConfig(_Strict):
    """DICOM TLS towards one peer."""

    enabled: bool = False
    ca: Path | None = None  # verify the peer's certificate against this CA bundle
    certificate: Path | None = None  # our client certificate, when the peer asks for one
    private_key: Path | None = None
    server_hostname: str | None = None


class ReceiverConfig(_Strict):
    """The C-STORE / C-ECHO SCP."""

    ae_title: AETitle = "SIJNODE"
    bind: str = "0.0.0.0"
    port: Port = 11112
    # Accept every storage SOP class (SR, KOS, PR, SEG, PDF, RT, ...), so that a PACS pushing a
    # whole study never fails because of the node; false: only MR/CT/CR/DX/SC image classes.
    accept_any_storage: bool = True
    # Calling AE titles allowed besides the peers'; "allow_any_calling_ae" lifts the check.
    extra_calling_ae_titles: list[AETitle] = []
    allow_any_calling_ae: bool = False
    # Called AE titles the node answers to; empty = only ae_title. Others get A-ASSOCIATE-RJ
    # "called AE title not recognized".
    called_ae_titles: list[AETitle] = []
    # Optional source-address allowlist (IP addresses or CIDR networks); empty = any. An entry
    # that is neither is an error (a typo must not open the node to every address).
    allowed_source_addresses: list[str] = []
    # The largest P-DATA PDU the node accepts, told to each peer in the A-ASSOCIATE-AC; a peer sends
    # PDUs up to this or its own send limit, whichever is smaller (dcmtk and Orthanc: 128 KiB). 0:
    # unlimited (up to limits.max_dataset_bytes). Bounded: larger PDUs measured no faster
    # (bench/pdu_size), a PDU is held whole in memory while it is decoded, and all of it must
    # arrive within limits.pdu_timeout_s.
    max_pdu_bytes: Annotated[int, Field(ge=0)] = 262144
    # Receiver processes sharing the port (SO_REUSEPORT), the database and the spool: one Python
    # process is bound by its GIL. "auto": one per CPU.
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Established associations at once; reserved_peer_associations of them only for peers.
    max_associations: Annotated[int, Field(ge=1)] = 16
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    limits: "ReceiverLimits" = Field(default_factory=lambda: ReceiverLimits())
    tls: TLSServerConfig = TLSServerConfig()

    @field_validator("allowed_source_addresses")
    @classmethod
    def _valid_networks(cls, entries: list[str]) -> list[str]:
        invalid = [entry for entry in entries if not _is_network(entry)]
        if invalid:
            raise ValueError(f"not an IP address or network: {', '.join(repr(e) for e in invalid)}")
        return entries

    @model_validator(mode="after")
    def _reservation_fits(self) -> "ReceiverConfig":
        if self.limits.reserved_peer_associations >= self.max_associations:
            raise ValueError("limits.reserved_peer_associations must be smaller than max_associations")
        return self

    @property
    def answered_called_ae_titles(self) -> list[str]:
        """The called AE titles an association request may name."""
        return sorted(set(self.called_ae_titles) | {self.ae_title}) if self.called_ae_titles else [self.ae_title]


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except (ValueError, TypeError):
        return False
    return True


class ReceiverLimits(_Strict):
    """What one peer (slow, silent or hostile) may hold of the receiver; see node/admission.py."""

    # A connection must have sent its whole A-ASSOCIATE-RQ this long after it was accepted.
    association_request_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # The TLS handshake, done off the accept path, must finish within this.
    tls_handshake_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Once a PDU has started, all of it must arrive within this (a dribbling peer is cut off).
    pdu_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # Connections still before their association request: in total and from one address.
    # When full, the oldest waiting one is closed to make room (a real peer sends its
    # request within milliseconds, so it is never the oldest for long).
    max_pending_connections: Annotated[int, Field(ge=1)] = 256
    max_pending_per_source: Annotated[int, Field(ge=1)] = 32
    # Established associations from one address (configured peers excepted).
    max_associations_per_source: Annotated[int, Field(ge=1)] = 8
    # Slots of max_associations only callers with a peer's AE title may take.
    reserved_peer_associations: Annotated[int, Field(ge=0)] = 2
    # A dataset larger than this (as received, or inflated from deflate) and any single
    # element larger than max_element_bytes get 0xA700 before they take more memory.
    max_dataset_bytes: Annotated[int, Field(ge=1024)] = 1 << 30
    max_element_bytes: Annotated[int, Field(ge=1024)] = 512 << 20
    # An A-ASSOCIATE-RQ larger than this is not a real one (128 contexts fit in ~100 KiB).
    max_association_request_bytes: Annotated[int, Field(ge=1024)] = 256 << 10


class StorageConfig(_Strict):
    data_dir: Path = Path("var")
    # SQLAlchemy URL; default: SQLite in data_dir. PostgreSQL: postgresql+psycopg://user@host/db
    database_url: str | None = None
    duplicates: Literal["keep-first", "replace"] = "keep-first"
    # Below this much free space in the spool, C-STORE answers 0xA700 (out of resources).
    free_space_reserve_mb: Annotated[int, Field(ge=0)] = 1024


class StudyConfig(_Strict):
    # A study completes this long after the last association that delivered it was released,
    # when no other association is delivering it (the sender said it is done)...
    release_grace_seconds: Annotated[float, Field(ge=0)] = 3.0
    # ...or, failing that, after this long without new instances (senders that keep
    # associations open, abort them, or split a study over associations with long pauses).
    quiet_seconds: Annotated[float, Field(ge=0)] = 30.0
    # Instances that arrive after a study completed: re-open it and process a new version,
    # or keep them without processing again.
    late_instances: Literal["reprocess", "ignore"] = "reprocess"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or systemd's CPU limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class WorkerConfig(_Strict):
    # "auto": one worker per enabled chain, at most one per CPU, so the chains of one study run
    # at the same time; each worker loads every enabled chain at start.
    processes: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    max_attempts: Annotated[int, Field(ge=1)] = 3
    lease_seconds: Annotated[float, Field(gt=0)] = 1800.0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # "auto": the CPUs shared out among the workers (at least 1 each).
    torch_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # fp32: the exact published computation. bf16: an optional faster mode on CPUs with AMX or
    # AVX512-BF16 (and on GPUs); its measured deviation is in bench/README.md.
    precision: Literal["fp32", "bf16"] = "fp32"
    # How xr-anatomy's forward passes run, all fp32 (pipeline.chains.base.PreparedNetwork):
    # eager (the reference), torchscript, onednn, channels_last, compile, onnxruntime (extra
    # "onnx"). Speed and deviation per runtime: bench/README.md (bench/xr_anatomy --runtimes).
    runtime: Literal["eager", "torchscript", "onednn", "channels_last", "compile", "onnxruntime"] = "eager"

    def worker_count(self, enabled_chains: int) -> int:
        """How many worker processes the service starts."""
        if self.processes != "auto":
            return self.processes
        return max(1, min(enabled_chains, available_cpus()))

    def threads_per_worker(self, enabled_chains: int) -> int:
        """torch threads of each worker: the CPUs divided among the workers, unless set."""
        if self.torch_threads != "auto":
            return self.torch_threads
        return max(1, available_cpus() // max(1, self.worker_count(enabled_chains)))


class DispatchConfig(_Strict):
    initial_backoff_s: Annotated[float, Field(gt=0)] = 10.0
    max_backoff_s: Annotated[float, Field(gt=0)] = 900.0
    # A delivery not acknowledged within this age is marked failed (``sijnode retry`` re-queues it).
    max_age_hours: Annotated[float, Field(gt=0)] = 72.0
    batch_size: Annotated[int, Field(ge=1)] = 50
    network_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class PeerConfig(_Strict):
    """A DICOM application entity the node talks to: it may send studies, receive results, or both."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: str
    port: Port
    # Results are sent to every peer with send_results true.
    send_results: bool = True
    tls: TLSClientConfig = TLSClientConfig()


class ClassificationConfig(_Strict):
    # Semicoronal MRI follows the sacrum, tilted 25-45° from true coronal: it must count as coronal.
    tilt_tolerance_deg: Annotated[float, Field(ge=0, le=45)] = DEFAULT_TILT_TOLERANCE_DEG
    # Tried in order before the built-in rules; the first match wins.
    rules: list[ClassificationRule] = []

    @model_validator(mode="after")
    def _rule_names_unique(self) -> "ClassificationConfig":
        check_rule_names(self.rules)
        return self


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    file: Path | None = None  # default: standard error (journald under systemd)
    # pynetdicom, pydicom, highdicom, MONAI...: their INFO is per PDU or per encoded object.
    libraries: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class MetricsConfig(_Strict):
    """Prometheus ``/metrics`` and ``/health`` over HTTP (node/metrics.py)."""

    enabled: bool = True
    bind: str = "127.0.0.1"  # loopback: put a reverse proxy or an SSH tunnel in front to scrape remotely
    port: Port = 9112


class Config(_Strict):
    """The whole config.yaml."""

    receiver: ReceiverConfig = ReceiverConfig()
    storage: StorageConfig = StorageConfig()
    study: StudyConfig = StudyConfig()
    workers: WorkerConfig = WorkerConfig()
    dispatch: DispatchConfig = DispatchConfig()
    peers: list[PeerConfig] = []
    classification: ClassificationConfig = ClassificationConfig()
    chains: list[ChainSpec] = []
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "Config":
        for what, names in (("peers", [p.name for p in self.peers]), ("chains", [c.name for c in self.chains])):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{what}: duplicate name(s) {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _series_blocks(self) -> "Config":
        """Give each chain without ``series.base`` one (9100, 9200, ... by position) and refuse
        chains whose blocks of series numbers overlap: PACS would show two series #N."""
        self.chains = [
            chain if chain.series.base is not None
            else chain.model_copy(update={"series": chain.series.model_copy(update={"base": DEFAULT_SERIES_BASE + SERIES_BLOCK * index})})
            for index, chain in enumerate(self.chains)
        ]
        ordered = sorted(self.chains, key=lambda chain: chain.series.base)
        for lower, upper in zip(ordered, ordered[1:]):
            if upper.series.base < lower.series.base + SERIES_BLOCK:
                raise ValueError(
                    f"chains {lower.name} and {upper.name}: series.base {lower.series.base} and {upper.series.base} are less than "
                    f"{SERIES_BLOCK} apart; each chain needs its own block of {SERIES_BLOCK} series numbers"
                )
        return self

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{self.storage.data_dir / 'sijnode.db'}"

    @property
    def enabled_chains(self) -> list[ChainSpec]:
        return [chain for chain in self.chains if chain.enabled]

    @property
    def receiver_count(self) -> int:
        processes = self.receiver.processes
        return available_cpus() if processes == "auto" else processes

    @property
    def worker_count(self) -> int:
        return self.workers.worker_count(len(self.enabled_chains))

    @property
    def torch_threads(self) -> int:
        return self.workers.threads_per_worker(len(self.enabled_chains))

    @property
    def allowed_calling_ae_titles(self) -> list[str]:
        """The calling-AE allowlist: every configured peer plus the extra titles."""
        return sorted({p.ae_title for p in self.peers} | set(self.receiver.extra_calling_ae_titles))

    @property
    def destinations(self) -> list[PeerConfig]:
        return [p for p in self.peers if p.send_results]

    def peer(self, name: str) -> PeerConfig:
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(f"no peer named {name!r} in the config")


class ConfigError(Exception):
    """config.yaml cannot be used; the message names each key and its problem."""


def _resolve_paths(config: Config, base: Path) -> Config:
    """Make relative paths relative to the config file's folder."""

    def resolve(path: Path | None) -> Path | None:
        if path is None or path.is_absolute():
            return path
        return (base / path).resolve()

    config.storage.data_dir = resolve(config.storage.data_dir)
    if config.logging.file is not None:
        config.logging.file = resolve(config.logging.file)
    tls = config.receiver.tls
    tls.certificate, tls.private_key, tls.client_ca = map(resolve, (tls.certificate, tls.private_key, tls.client_ca))
    for peer in config.peers:
        peer.tls.ca, peer.tls.certificate, peer.tls.private_key = map(
            resolve, (peer.tls.ca, peer.tls.certificate, peer.tls.private_key)
        )
    config.chains = [
        chain.model_copy(update={"pack": str(resolve(Path(chain.pack)))}) if chain.pack else chain for chain in config.chains
    ]
    return config


def _key_path(location: tuple[Any, ...], data: Any) -> tuple[str, type[BaseModel] | None]:
    """``peers[pacs].port`` for pydantic's ``peers.0.port``: list entries by their ``name``.

    Also returns the model the last part belongs to, for suggesting a valid key.
    """
    text = ""
    model: type[BaseModel] | None = Config
    node: Any = data
    for part in location:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) else None
            text += f"[{name}]" if name else f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        text += f".{part}" if text else str(part)
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _model_of(field.annotation) if field is not None else None
        node = node.get(part) if isinstance(node, dict) else None
    return text, model


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config section model inside an annotation such as ``list[PeerConfig]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        if (found := _model_of(argument)) is not None:
            return found
    return None


def _describe(error: ValidationError, data: Any) -> str:
    lines = []
    for item in error.errors():
        key, _ = _key_path(item["loc"], data)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            _, parent = _key_path(item["loc"][:-1], data)
            known = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.6)
            # No quotes around the suggestion: the log's redaction layer drops quoted values.
            message = "unknown key" + (f"; did you mean {close[0]}?" if close else (f" (known: {', '.join(known)})" if known else ""))
        lines.append(f"{key or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], base: Path) -> Config:
    """Validate an already-parsed config mapping; relative paths resolve against ``base``."""
    try:
        return _resolve_paths(Config.model_validate(data), base)
    except ValidationError as error:
        raise ConfigError(_describe(error, data)) from None


def load_config(path: Path | str) -> Config:
    """Read and validate config.yaml, raising ConfigError with a readable message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        # libyaml's loader when PyYAML has it: a third of the pure-Python parse, for every CLI call
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as error:
        raise ConfigError(f"{path}:\n{error}") from None


ReceiverConfig.model_rebuild()
Config.model_rebuild()
