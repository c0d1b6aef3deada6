"""Empty stand-ins for the packages torchtune imports on its way to the model builders and never calls there.

torchtune is not one of memcalc's extras; the benchmarks that import its source (qlora_torchtune.py,
torchtune_qlora_reserved.py) call ``install()`` first. Only packages this Python cannot find are stood in for.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# torchtune's data, tokenizer and logging modules import these at package import; the model builders never use them.
# (pkg_resources: torchtune of April 2024 imports packaging from it.)
DATA_ONLY = ("datasets", "PIL", "torchdata", "torchvision", "tiktoken", "sentencepiece", "blobfile", "kagglehub",
             "omegaconf", "tokenizers", "jinja2", "pkg_resources")


class _Absent:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __class_getitem__(cls, item: object) -> type:
        return cls


def _attribute(name: str) -> type:
    if name.startswith("__"):  # (inspect and importlib ask modules for their dunders)
        raise AttributeError(name)
    return _Absent


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        # (pkg_resources always: setuptools' own is deprecated and may lack the packaging attribute torchtune imported)
        self.absent = {name for name in DATA_ONLY if name == "pkg_resources" or importlib.util.find_spec(name) is None}

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.absent:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _attribute
        return module

    def exec_module(self, module):
        return None


def install() -> None:
    """Put the stand-ins before the real finders (once)."""
    if not any(isinstance(finder, _StandIn) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StandIn())
