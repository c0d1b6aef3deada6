"""Reading a JSON file that a user handed us: as data, bounded, and failing in one line.

Every file memcalc reads (a model's ``config.json``, a DeepSpeed config, a preset) goes through ``read_json``:
- only regular files: a FIFO would block forever and ``/dev/zero`` never ends, so anything else is refused;
- at most ``MAX_FILE_BYTES``: a real ``config.json`` is a few KB (the largest Hugging Face configs, with
  per-layer lists, stay under 1 MB), so a larger file is refused instead of read;
- UTF-8 only, JSON only (never executed), nesting bounded (the parser's recursion limit becomes a ConfigError).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from typing import Any

from memcalc.errors import ConfigError, printable

MAX_FILE_BYTES = 16 * 2**20  # 16 MiB: 16x the largest config.json seen on the hub
# Longest user text echoed into a one-line error: a full path fits, a pasted blob does not.
MAX_SHOWN_CHARS = 120


def shown(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """User text made safe for a one-line message: control and other non-printable characters escaped as
    ``repr`` does (a newline becomes ``\\n``, an ANSI escape ``\\x1b``, an undecodable argv byte ``\\udcff``),
    and text longer than ``limit`` characters cut, with an ellipsis and the full length."""
    value = str(text)
    cut = value[:limit]
    escaped = printable(cut)
    return escaped if len(value) <= limit else f"{escaped}... ({len(value):,} characters)"


def read_json(path: str | os.PathLike[str], what: str = "config file",
              object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """The JSON value in ``path``. Raises ConfigError with one line naming the file and the problem."""
    where = shown(os.fsdecode(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"{where}: {what} not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a folder; give the {what} itself") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or type(exc).__name__}; "
                          "check the path and its permissions") from None
    except ValueError:  # a NUL character: no file can have that name
        raise ConfigError(f"{where}: a file name cannot contain a NUL character; check the path") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{where} is a folder; give the {what} itself")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where} is not a regular file (a pipe, device or socket); give the {what} itself")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{where} is {info.st_size:,} bytes, too large for a {what} "
                              f"(limit {MAX_FILE_BYTES // 2**20} MiB); check the path")
        with os.fdopen(fd, "rb", closefd=True) as file:
            fd = -1
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or type(exc).__name__}; "
                          "check the path and its permissions") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_FILE_BYTES // 2**20} MiB, too large for a {what}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); a {what} is a JSON text file") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                          "memcalc reads strict JSON (no comments or trailing commas)") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a {what}") from None


def read_json_object(path: str | os.PathLike[str], what: str = "config file",
                     object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> dict[str, Any]:
    """``read_json``, which must hold a JSON object."""
    data = read_json(path, what, object_pairs_hook)
    if not isinstance(data, dict):
        raise ConfigError(f"{shown(os.fsdecode(path))} must hold a JSON object (a {what}), not a {type(data).__name__}")
    return data
