"""Structured logging.

One JSON object per line (or plain text) with the event's fields. The node logs UIDs, AE titles,
addresses and statuses, never a patient's name, ID or birth date: no code here is handed a
dataset, and ``PHIFilter`` drops anything that looks like those attributes as a second guard.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_PHI_KEYWORDS = re.compile(r"Patient(Name|ID|BirthDate|'s Name|'s Birth Date)|\(0010,\s*00(10|20|30)\)", re.IGNORECASE)


class PHIFilter(logging.Filter):
    """Redact records that mention patient-identifying attributes.

    pynetdicom at DEBUG level may print dataset summaries; no record naming PatientName,
    PatientID, PatientBirthDate (or their tags) leaves the process.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _PHI_KEYWORDS.search(message):
            record.msg = "[record redacted: mentioned patient-identifying attributes]"
            record.args = ()
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)  # journald takes UTF-8: short UIDs keep their …


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", {})
        return text + "".join(f" {key}={value}" for key, value in fields.items())


#: Libraries whose INFO is chatter for an admin: pynetdicom logs every PDU and association,
#: highdicom ~50 lines per encoded study, alembic every migration check.
LIBRARY_LOGGERS = ("pynetdicom", "pydicom", "highdicom", "monai", "alembic", "PIL", "matplotlib", "urllib3", "safetensors")


def setup_logging(level: str = "INFO", fmt: str = "json", file: Path | None = None, libraries: str = "WARNING") -> None:
    """Configure the root logger once per process; ``libraries``: the level of LIBRARY_LOGGERS."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(PHIFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_levels(level, libraries)


def set_levels(level: str, libraries: str = "WARNING") -> None:
    """The node's own level and the libraries' (also on a config reload)."""
    logging.getLogger().setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(libraries)
    # pynetdicom logs a refused or rejected association as two or three ERROR lines; the node
    # logs each such failure once, with its cause, so pynetdicom's own show only when debugging.
    if logging.getLevelName(libraries) >= logging.WARNING:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (UIDs, AE titles, statuses; never patient data)."""
    logger.log(level, message, extra={"fields": fields})
