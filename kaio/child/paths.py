"""Paths as the record gives them: relative to the folder kaio runs in, whatever folder the script moves to.

A script may change its working directory (Hydra's runs do) and then save to a relative ``output_dir``: the
path the Trainer reports is relative to the script's folder of the moment, which kaio, resuming, would read
against its own.
"""

from __future__ import annotations

import os

_kaio_folder: str | None = None


def note_kaio_folder() -> None:
    """Called by kaio.child's entry point before the script runs, in the folder kaio runs in."""
    global _kaio_folder
    _kaio_folder = os.getcwd()


def recorded_path(path: str) -> str:
    """``path`` (as the script gives it, now) relative to the folder kaio runs in; an absolute path as it is."""
    here = os.getcwd()
    if os.path.isabs(path) or _kaio_folder is None or here == _kaio_folder:
        return path
    return os.path.relpath(os.path.join(here, path), _kaio_folder)
