"""vas.core.logs: the one logging set-up of the daemons, text and json."""
from __future__ import annotations

import io
import json
import logging

import pytest

from vas.core.logs import setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_is_one_object_per_line_with_the_exception_text(restore_root):
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("vas.test")
    log.debug("not at INFO")
    log.info("plain %s", "message")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("it failed: %d", 7)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first.keys() == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "vas.test",
                                                                    "plain message")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert (second["level"], second["message"]) == ("ERROR", "it failed: 7")
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert second["exception"].endswith("ValueError: boom\nsecond line")


def test_text_and_the_handlers_it_replaces(restore_root):
    first, out = io.StringIO(), io.StringIO()
    setup_logging("DEBUG", "text", stream=first)
    setup_logging("WARNING", "text", stream=out)  # one log per process: replaced, not added
    logging.getLogger("vas.test").info("hidden")
    logging.getLogger("vas.test").warning("shown")
    assert first.getvalue() == ""
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" WARNING vas.test: shown")


@pytest.mark.parametrize("level, log_format, message", [
    ("LOUD", "text", "invalid log level 'LOUD': expected one of DEBUG, INFO, WARNING, "
                     "ERROR, CRITICAL"),
    ("INFO", "xml", "invalid log format 'xml': expected one of text, json"),
])
def test_bad_level_or_format(restore_root, level, log_format, message):
    with pytest.raises(ValueError) as info:
        setup_logging(level, log_format, stream=io.StringIO())
    assert str(info.value) == message
