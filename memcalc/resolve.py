"""MODEL argument -> ModelConfig: a preset name or alias, a config.json path, a model folder, or a hub id.

Configs are data: read with the standard library (``memcalc.datafile``: regular files only, bounded size), never
through ``trust_remote_code``. Hub ids fetch ``config.json`` only (never weights) through huggingface_hub,
imported lazily, with one short probe and no retries, its logging and progress bars silenced during the call.
Every failure is one memcalc error: ModelNotFoundError when the name or path does not resolve,
ConfigError when a file is there but cannot be read or is not a config. User text echoed into a message goes
through ``shown`` (control characters escaped, long text cut) so the message stays one line.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memcalc.families import Described
    from memcalc.families.base import Arch

from memcalc import families
from memcalc.catalog import find_model_preset, load_model_preset, model_preset_files, suggest
from memcalc.datafile import read_json_object, shown
from memcalc.errors import ConfigError, ModelNotFoundError, UsageError
from memcalc.model import ROLE_POSITION_EMBEDDING, ModelConfig, ParamTensor

__all__ = ["HUB_TIMEOUT_SECONDS", "ModelInput", "model_input", "model_of", "resolve_model"]

# Seconds the hub probe (one HEAD of config.json, no retries) may take before we call the hub unreachable.
# huggingface_hub's own etag timeout is 10 s and it then retries with backoff (1+2+4+8+8 s, utils/_http.py),
# 24 s in all. A HEAD answers in well under 1 s; 5 s, plus the 3 s huggingface_hub >= 1.x may spend once a day
# fetching its agent-harness list for the user agent (utils/_detect_agent.py), keeps a failure under 10 s.
HUB_TIMEOUT_SECONDS = 5
HUB_CONFIG_FILE = "config.json"
# A hub repo id as huggingface_hub validates it (utils/_validators.py, REPO_ID_REGEX): namespace/name, each of
# word characters, '-' and '.', at most 96 characters, starting and ending with a word character.
_HUB_ID = re.compile(r"\b[\w.-]{1,96}\b/\b[\w.-]{1,96}\b", re.ASCII)


def resolve_model(reference: str) -> ModelConfig:
    """Resolve what the user typed. Order: existing path, preset (and its aliases), hub id."""
    if not reference.strip():
        raise ModelNotFoundError("the MODEL argument is empty; give a preset name (memcalc presets), "
                                 "a config.json path, a model folder or a hub id")
    path = _existing_path(reference)
    if path is not None:
        return _from_path(path, reference)
    preset = find_model_preset(reference)
    if preset is not None:
        raw = load_model_preset(preset)
        return ModelConfig(
            name=preset, raw=raw, source=str(raw.get("_source", f"preset {preset}")),
            aliases=tuple(raw.get("_aliases", ())),
        )
    if _looks_like_path(reference):
        raise ModelNotFoundError(f"no such file or folder: {shown(reference)}; "
                                 "give a config.json path, a model folder or a preset name")
    if _looks_like_hub_id(reference):
        return _from_hub(reference)
    hint = suggest(reference, list(model_preset_files()))
    did_you_mean = f"did you mean {', '.join(hint)}? " if hint else ""
    raise ModelNotFoundError(
        f"unknown model '{shown(reference)}'; {did_you_mean}run 'memcalc presets' for the list, "
        "or give a config.json path or {params} 7B"
    )


def _existing_path(reference: str) -> Path | None:
    """The file or folder ``reference`` names, or None when there is none (or it cannot be a path at all)."""
    try:
        path = Path(reference).expanduser()
    except RuntimeError:  # '~nosuchuser/...': no such user, or no home folder to expand '~' to
        raise ModelNotFoundError(f"cannot expand '{shown(reference)}': no such user or home folder; "
                                 "give the path without '~'") from None
    try:
        return path if path.exists() else None
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ):  # not a usable file name: a name, or nothing
            return None
        raise ConfigError(f"cannot read {shown(path)}: {exc.strerror or type(exc).__name__}; "
                          "check the path and the permissions of its folders") from None


def _looks_like_path(text: str) -> bool:
    """Typed as a path (a .json file, a relative or absolute path, several folders), not as a name or hub id."""
    if text.endswith(".json") or text.startswith((".", "/", "~")) or text.count("/") >= 2:
        return True
    return os.sep != "/" and os.sep in text  # a Windows path


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".json")


def _from_path(path: Path, reference: str) -> ModelConfig:
    if path.is_dir():
        config_path = path / "config.json"
        try:
            present = config_path.exists()
        except OSError as exc:  # the folder cannot be searched (chmod 000) or the name is unusable
            raise ConfigError(f"cannot read the folder {shown(path)}: {exc.strerror or type(exc).__name__}; "
                              "check its permissions") from None
        if not present:
            if not os.access(path, os.R_OK | os.X_OK):
                raise ConfigError(f"cannot read the folder {shown(path)}: permission denied; check its permissions")
            raise ConfigError(f"{shown(path)} has no config.json; "
                              "point MODEL at the config file or the model folder holding it")
        path = config_path
    raw = read_json_object(path, "config.json")
    _check_config(raw, shown(path))
    return ModelConfig(name=reference, raw=raw, source=str(path))


def _check_config(raw: dict[str, Any], where: str) -> None:
    if "model_type" not in raw and "text_config" not in raw:
        raise ConfigError(
            f"{where} has no 'model_type'; memcalc reads Hugging Face config.json files (or use {{params}} 7B)"
        )


def _from_hub(repo_id: str) -> ModelConfig:
    """Fetch only config.json of a hub repo (honours HF_HUB_OFFLINE, HF_ENDPOINT and the local HF cache)."""
    try:
        import huggingface_hub  # lazy: only hub ids need it
    except ImportError:
        raise ModelNotFoundError(
            f"'{shown(repo_id)}' looks like a hub id but huggingface_hub is not installed; "
            "pip install huggingface_hub, or use a preset name or a local config.json"
        ) from None
    with _quiet_hub():
        local = _fetch_hub_config(huggingface_hub, repo_id)
    raw = read_json_object(local, "config.json")
    _check_config(raw, f"the config.json of hub repo '{shown(repo_id)}'")
    return ModelConfig(name=repo_id, raw=raw, source=f"{repo_id} config.json (hub)")


def _fetch_hub_config(hub: Any, repo_id: str) -> str:
    """Local path of the repo's config.json: from the hub when it answers, else from the local cache.

    huggingface_hub's own ``hf_hub_download`` answers a failed first request with up to five retries and
    backoff (24 s, a dozen log lines). So the hub is first asked once, with a short timeout and no retries
    (``get_hf_file_metadata``), and the download runs only when that probe succeeded.
    """
    if _hub_offline():
        cached = _cached_hub_config(hub, repo_id)
        if cached is not None:
            return cached
        raise ModelNotFoundError(
            f"hub repo '{shown(repo_id)}': offline mode is on (HF_HUB_OFFLINE) and its config.json is not in the "
            "local Hugging Face cache; unset HF_HUB_OFFLINE to fetch it, or use a preset name or a config.json path"
        )
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(repo_id, HUB_CONFIG_FILE), timeout=HUB_TIMEOUT_SECONDS)
        return hub.hf_hub_download(repo_id, HUB_CONFIG_FILE, etag_timeout=HUB_TIMEOUT_SECONDS)
    except Exception as exc:  # noqa: BLE001 -- every hub failure becomes one line naming its cause
        cause = _network_cause(exc)
        if cause is None:
            raise _hub_error(repo_id, exc) from None
        cached = _cached_hub_config(hub, repo_id)
        if cached is not None:
            return cached
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face Hub for '{shown(repo_id)}' ({cause}) and its config.json is not in "
            "the local cache; check the network (or HF_ENDPOINT), or use a preset name or a config.json path"
        ) from None


def _hub_offline() -> bool:
    from huggingface_hub import constants  # read at call time: tests and users may change it after import

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else getattr(constants, "HF_HUB_OFFLINE", False))


def _cached_hub_config(hub: Any, repo_id: str) -> str | None:
    """config.json of ``repo_id`` from the local cache, without touching the network; None when not cached."""
    try:
        return str(hub.hf_hub_download(repo_id, HUB_CONFIG_FILE, local_files_only=True))
    except Exception:  # noqa: BLE001 -- not cached (LocalEntryNotFoundError), or unreadable: the caller says why
        return None


def _error_class(name: str) -> type[BaseException] | tuple[()]:
    """A huggingface_hub error class by name; an empty tuple (matches nothing) when this version lacks it."""
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.24 kept them in utils
        from huggingface_hub import utils as errors
    return getattr(errors, name, ())


def _hub_error(repo_id: str, exc: BaseException) -> ModelNotFoundError:
    """One line for a hub failure that is not a network failure, naming its cause."""
    repo = shown(repo_id)
    if isinstance(exc, _error_class("GatedRepoError")):  # a RepositoryNotFoundError subclass: test it first
        return ModelNotFoundError(
            f"hub repo '{repo}' is gated: accept its terms on huggingface.co and log in (HF_TOKEN or "
            "'hf auth login'), or download its config.json and pass the file"
        )
    if isinstance(exc, _error_class("RepositoryNotFoundError")):
        return ModelNotFoundError(
            f"hub repo '{repo}' does not exist (or is private and no token with access was given); "
            "check the id, or run 'memcalc presets' for the built-in models"
        )
    if isinstance(exc, _error_class("RevisionNotFoundError")):
        return ModelNotFoundError(f"hub repo '{repo}' has no main revision; download its config.json and pass the file")
    if isinstance(exc, _error_class("DisabledRepoError")):
        return ModelNotFoundError(f"hub repo '{repo}' is disabled by its owner; use another repo or a config.json path")
    remote_entry = not isinstance(exc, _error_class("LocalEntryNotFoundError"))
    if isinstance(exc, _error_class("EntryNotFoundError")) and remote_entry:
        return ModelNotFoundError(
            f"hub repo '{repo}' has no config.json (not a transformers model?); "
            "give a config.json path or a parameter count ({params} 7B)"
        )
    if isinstance(exc, _error_class("HFValidationError")):
        return ModelNotFoundError(f"'{repo}' is not a valid hub id (namespace/name); check the spelling")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(exc, _error_class("HfHubHTTPError")) and status is not None:
        return ModelNotFoundError(
            f"the Hugging Face Hub answered HTTP {status} for '{repo}'; try again later, "
            "or use a preset name or a config.json path"
        )
    return ModelNotFoundError(
        f"could not fetch the config.json of '{repo}' from the Hugging Face Hub ({type(exc).__name__}); "
        "use a preset name (memcalc presets) or a config.json path"
    )


# Names of the network-failure classes of the HTTP clients huggingface_hub has used (requests, httpx, httpx2):
# matched by name so that none of them has to be imported here.
_TIMEOUT_NAMES = frozenset({"Timeout", "TimeoutException", "ConnectTimeout", "ReadTimeout", "PoolTimeout",
                            "WriteTimeout"})
_CONNECTION_NAMES = frozenset({"ConnectError", "ConnectionError", "NetworkError", "ProxyError", "SSLError",
                               "RemoteProtocolError", "ReadError", "WriteError"})


def _network_cause(exc: BaseException) -> str | None:
    """Why the hub could not be reached ('connection refused', 'no answer within 5 s', ...), or None when the
    failure is not a network failure (the hub answered, or the request was refused before it left)."""
    offline = _error_class("OfflineModeIsEnabled")
    http_error = _error_class("HfHubHTTPError")
    for error in _chain(exc):
        if isinstance(error, offline):
            return "offline mode is on (HF_HUB_OFFLINE)"
        if isinstance(error, http_error):  # the hub answered: not a network failure
            return None
        names = {cls.__name__ for cls in type(error).__mro__}
        text = str(error).lower()
        if isinstance(error, TimeoutError) or names & _TIMEOUT_NAMES:
            return f"no answer within {HUB_TIMEOUT_SECONDS} s"
        if isinstance(error, ConnectionRefusedError) or "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text or "name resolution" in text \
                or "getaddrinfo" in text:
            return "the host name does not resolve: no network or no DNS"
        if isinstance(error, ConnectionError) or names & _CONNECTION_NAMES:
            return "no connection"
    return None


def _chain(exc: BaseException, depth: int = 6) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, nearest first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and depth > 0 and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
        depth -= 1


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub without its retry logs, warnings and progress bars; all restored afterwards."""
    import logging
    import warnings

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    bars = _progress_bars()
    bars_were_on = bars is not None and not bars.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL + 1)  # above CRITICAL: nothing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bars_were_on:
                bars.disable_progress_bars()
            try:
                yield
            finally:
                if bars_were_on:
                    bars.enable_progress_bars()
    finally:
        logger.setLevel(level)


def _progress_bars() -> Any:
    """huggingface_hub.utils when it has the public progress-bar switches, else None."""
    try:
        from huggingface_hub import utils
    except ImportError:
        return None
    wanted = ("are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars")
    return utils if all(hasattr(utils, name) for name in wanted) else None


# -- the model the engine estimates ----------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class ModelInput:
    """What the engine estimates for: exact tensors from an inventory, or a raw count as one flat tensor."""

    name: str
    source: str
    model_type: str | None
    tensors: tuple[ParamTensor, ...]
    architecture_known: bool
    config: ModelConfig | None = None
    notes: tuple[str, ...] = ()  # e.g. "counted from its text_config", "built on the meta device"
    described: Described | None = None  # what its family resolved (memcalc.families.describe); None: a bare count

    @classmethod
    def from_count(cls, num_params: int, name: str = "custom", source: str = "--params") -> ModelInput:
        flat = ParamTensor(name="params", shape=(num_params,), layer=None, role="other")
        return cls(name=name, source=source, model_type=None, tensors=(flat,), architecture_known=False)

    @property
    def arch(self) -> Arch | None:
        """The resolved config (memcalc.families.base.Arch); None for a bare parameter count."""
        return self.described.arch if self.described is not None else None

    @property
    def hidden_size(self) -> int | None:
        """The model's hidden size (what HF's DeepSpeed integration sizes buckets by); None when unknown."""
        return self.arch.hidden_size or None if self.arch is not None else None


def model_input(model_ref: str | None, num_params: int | None) -> ModelInput:
    """Resolve a model reference and/or a parameter count; a count replaces the model's (no shapes then)."""
    if model_ref is None and num_params is None:
        raise UsageError("give a {model} (preset name, config.json path) or {params} 7B; see 'memcalc presets'")
    config: ModelConfig | None = resolve_model(model_ref) if model_ref is not None else None
    if num_params is not None:
        if config is None:
            return ModelInput.from_count(num_params)
        # A count overrides the count of a named model: no shapes, but the architecture stays for activations.
        flat = ModelInput.from_count(num_params, name=config.name, source=f"{config.source}, count from --params")
        described = families.describe(config)
        return ModelInput(name=flat.name, source=flat.source, model_type=described.declared_type or None,
                          tensors=flat.tensors, architecture_known=False, config=config, described=described)
    assert config is not None
    return model_of(config)


def model_of(config: ModelConfig) -> ModelInput:
    """The model a config describes: its family's resolved view and its exact tensors."""
    described = families.describe(config)
    tensors = tuple(described.inventory())
    positions = [t.shape[0] for t in tensors if t.role == ROLE_POSITION_EMBEDDING and t.shape]
    if positions and not described.arch.learned_positions:
        # A class built on the meta device with a learned position table (GPT-Neo's wpe): no row exists for a
        # longer sequence. Its bound is the config's, else the table's rows.
        arch = dataclasses.replace(described.arch, learned_positions=True,
                                   max_positions=described.arch.max_positions or min(positions))
        described = dataclasses.replace(described, arch=arch)
    return ModelInput(name=config.name, source=config.source, model_type=described.declared_type or None,
                      tensors=tensors, architecture_known=True, config=config,
                      notes=tuple(described.inventory_notes()), described=described)
