"""Structured logging, and the one redaction layer every log record passes.

One JSON object per line (or plain text) with the event's fields. The node logs UIDs, AE titles,
addresses and statuses, never a patient's name, ID or birth date. Third-party libraries are
another matter: pydicom quotes raw values in its warnings ("Invalid value for VR UI: '...'",
bytes that may run on into the patient module), pynetdicom dumps datasets at DEBUG level. So
every record, whichever logger wrote it, and Python warnings and uncaught exceptions (routed to
logging here instead of bare stderr) pass ``RedactingFilter`` on the handler: quoted values,
bracketed value dumps and raw bytes are cut out, records naming patient attributes are dropped
to a placeholder, and no record is longer than ``MAX_MESSAGE_CHARS``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Patient-identifying attributes by keyword, name or tag (all of group 0010, the patient module).
_PHI_KEYWORDS = re.compile(
    r"Patient(Name|ID|BirthDate|BirthTime|Address|'s ?Name|'s ?Birth|'s ?Address)|OtherPatient|\(0010,\s*[0-9A-F]{4}\)",
    re.IGNORECASE,
)
# A quoted value: '...', "...", b'...' (the opening quote not inside a word, so "Patient's"
# does not open one; a traceback's File "path" stays). Values are what carry identifiers; the
# words around them are kept.
_QUOTED = re.compile(r"(?<![A-Za-z0-9])b?'(?:[^'\\\n]|\\.)*'" + r'|(?<![A-Za-z0-9])(?<!File )b?"(?:[^"\\\n]|\\.)*"')
# pynetdicom's dataset dumps put values in brackets: "(0010,0010) PN [DOE^JANE]".
_BRACKETED = re.compile(r"\[(?!value redacted\])[^\[\]\n]*\]")
REDACTED_VALUE = "'[value redacted]'"
REDACTED_RECORD = "[record redacted: mentioned patient-identifying attributes]"
MAX_MESSAGE_CHARS = 2000


def redact(text: str, *, brackets: bool = False) -> str:
    """``text`` without quoted values (and, with ``brackets``, bracketed value dumps), cut to
    ``MAX_MESSAGE_CHARS``. Used for log records and for error texts stored in the database."""
    text = _QUOTED.sub(REDACTED_VALUE, text)
    if brackets:
        text = _BRACKETED.sub("[value redacted]", text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + f"... [{len(text) - MAX_MESSAGE_CHARS} characters cut]"
    return text


class RedactingFilter(logging.Filter):
    """The redaction layer: on the handler, so it sees every record of every logger.

    The node's own records keep their wording (values in them are quoted, and go); records of
    third-party libraries also lose bracketed dumps; any record naming a patient attribute is
    replaced as a whole, since its values need not be quoted.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not lose the record or leak args
            message = str(record.msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        own = record.name.startswith("sijnode")
        if _PHI_KEYWORDS.search(message) or (record.exc_text and _PHI_KEYWORDS.search(record.exc_text)):
            record.msg, record.exc_text = REDACTED_RECORD, None
        else:
            record.msg = redact(message, brackets=not own)
            if record.exc_text:
                record.exc_text = redact(record.exc_text, brackets=not own)
        record.args = ()
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


# The old name: kept so code and tests that attach it keep working.
PHIFilter = RedactingFilter


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", {})
        return text + "".join(f" {key}={value}" for key, value in fields.items())


def setup_logging(level: str = "INFO", fmt: str = "json", file: Path | None = None) -> None:
    """Configure the root logger once per process, with the redaction layer on its handler.

    Python warnings and uncaught exceptions (main thread and others) go through logging too,
    so nothing reaches stderr unredacted.
    """
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom is chatty at INFO (every association); keep it to warnings unless debugging.
    logging.getLogger("pynetdicom").setLevel(level if level == "DEBUG" else "WARNING")
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, args.thread)


def _log_uncaught(exc_type, exc_value, exc_traceback, thread: threading.Thread | None = None) -> None:
    if exc_type is SystemExit:
        return
    where = f" in thread {thread.name}" if thread is not None else ""
    logging.getLogger("sijnode.uncaught").error(f"uncaught exception{where}", exc_info=(exc_type, exc_value, exc_traceback))


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (UIDs, AE titles, statuses; never patient data)."""
    logger.log(level, message, extra={"fields": fields})
