"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new one,
never part of one."""

import json
import os


def replace_atomically(path, write):
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_torch(obj, path):
    import torch
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    replace_atomically(path, write)


def load_torch(path, what, weights_only=True):
    """``torch.load(path)``, or a ValueError that names the file and ``what`` it holds (a
    truncated or foreign file never yields another state)."""
    import torch
    try:
        return torch.load(path, weights_only=weights_only)
    except Exception as error:
        raise ValueError(f"cannot read {what} {path} ({type(error).__name__}: {error}); it is "
                         "truncated or not one; remove it") from error
