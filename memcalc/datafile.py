"""Reading a JSON file that a user handed us: as data, bounded, and failing in one line.

Every file memcalc reads (a model's ``config.json``, a DeepSpeed config, a preset) goes through ``read_json``:
- only regular files: a FIFO would block forever and ``/dev/zero`` never ends, so anything else is refused;
- at most ``MAX_FILE_BYTES``: a real ``config.json`` is a few KB (the largest Hugging Face configs, with
  per-layer lists, stay under 1 MB), so a larger file is refused instead of read;
- UTF-8 only, JSON only (never executed), nesting bounded (the parser's recursion limit becomes a ConfigError).

A trainer's YAML config (``--from``) goes through ``read_yaml_mapping``: the same bounded read with a 256 KiB cap,
PyYAML's ``SafeLoader`` only, as ``safe_load`` uses it (plain data: no tags that build Python objects; its scanner
also stops past ``MAX_YAML_DEPTH`` nested levels), and the loaded value walked with a budget
of ``MAX_YAML_VALUES`` values and ``MAX_YAML_DEPTH`` levels, counted with every alias expanded, so that an
anchors-and-aliases bomb or a self-referencing alias is refused instead of expanded.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from typing import Any

from memcalc.errors import ConfigError, MissingDependencyError, printable

MAX_FILE_BYTES = 16 * 2**20  # 16 MiB: 16x the largest config.json seen on the hub
# A trainer config is a few KB (the largest axolotl, torchtune and LLaMA-Factory examples are under 10 KB); PyYAML's
# pure-Python loader reads 256 KiB in about a second here.
MAX_YAML_BYTES = 256 * 2**10
# Values (mapping entries, list items, scalars) a YAML config may hold once its aliases are expanded, and levels of
# nesting: a trainer config has a few hundred values, five levels at most.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64
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


def read_bytes(path: str | os.PathLike[str], what: str = "config file", limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit``. Raises ConfigError with one line naming the file."""
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
        if info.st_size > limit:
            raise ConfigError(f"{where} is {info.st_size:,} bytes, too large for a {what} "
                              f"(limit {_size(limit)}); check the path")
        with os.fdopen(fd, "rb", closefd=True) as file:
            fd = -1
            data = file.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or type(exc).__name__}; "
                          "check the path and its permissions") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{where} is larger than {_size(limit)}, too large for a {what}")
    return data


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit // 2**10} KiB"


def read_json(path: str | os.PathLike[str], what: str = "config file",
              object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """The JSON value in ``path``. Raises ConfigError with one line naming the file and the problem."""
    where = shown(os.fsdecode(path))
    data = read_bytes(path, what)
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


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "trainer config") -> dict[str, Any]:
    """The mapping a YAML file holds, read with PyYAML's ``safe_load``. Raises ConfigError with one line naming the
    file and the problem, MissingDependencyError without PyYAML (the ``yaml`` extra)."""
    where = shown(os.fsdecode(path))
    try:
        import yaml  # the [yaml] extra; imported only for a YAML file
    except ImportError:
        raise MissingDependencyError(f"{where}: reading a YAML {what} needs PyYAML; "
                                     "pip install 'memcalc-train[yaml]' (or give a JSON config)") from None
    data = read_bytes(path, what, MAX_YAML_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); a {what} is a YAML text file") from None
    try:
        value = yaml.load(text, Loader=_bounded_safe_loader(yaml))  # SafeLoader, bounded: see _bounded_safe_loader
    except _TooDeep:
        raise ConfigError(f"{where} is nested more than {MAX_YAML_DEPTH} levels deep; a {what} is a few levels "
                          "deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {shown(problem)}; memcalc reads plain YAML data "
                          "(safe_load: no tags that build Python objects)") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a {what}") from None
    _check_expanded_size(value, where, what)
    if value is None:
        raise ConfigError(f"{where} is empty; a {what} is a mapping of settings")
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must hold a mapping of settings (a {what}), not a {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: top-level key {shown(repr(key))} is not a name; a {what} maps names to "
                              "values")
    return value


class _TooDeep(Exception):
    pass


def _bounded_safe_loader(yaml: Any) -> type:
    """``yaml.SafeLoader`` (what ``yaml.safe_load`` uses: the safe constructor, plain data only) with one addition:
    its scanner refuses more than ``MAX_YAML_DEPTH`` nested flow collections or indentation levels as it meets them.
    PyYAML's scanner slows quadratically with nesting (3 s for 2,000 '[' here) before its composer's recursion would
    stop; this stops at the 65th level, in microseconds."""

    class BoundedSafeLoader(yaml.SafeLoader):
        def fetch_flow_collection_start(self, token_class: Any) -> None:
            if self.flow_level >= MAX_YAML_DEPTH:
                raise _TooDeep
            super().fetch_flow_collection_start(token_class)

        def add_indent(self, column: int) -> bool:
            if len(self.indents) >= MAX_YAML_DEPTH:
                raise _TooDeep
            return super().add_indent(column)

    return BoundedSafeLoader


def _check_expanded_size(value: Any, where: str, what: str) -> None:
    """Walk the loaded value as a consumer would, aliases expanded, and refuse it past the budget or the depth.

    ``safe_load`` shares one object for every alias of an anchor, so a small file can stand for billions of values
    (and an alias inside its own anchor for an endless one); the walk stops at the first value over budget.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_YAML_VALUES:,} values (YAML anchors and aliases "
                              f"repeat them); a {what} holds a few hundred")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where} is nested more than {MAX_YAML_DEPTH} levels deep (or an alias refers to "
                              f"itself); a {what} is a few levels deep")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
