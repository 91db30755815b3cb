"""The one rule for pickled weights, which DiffSeg refuses wherever a bundle enters (load, validate, install).

Unpickling can run any code, so a pickle is never opened, only recognised: by its name (the
suffixes torch, Lightning and pickle write) or, for any other file, by its first bytes (a pickle
stream, or torch's zip checkpoint holding a .pkl). .safetensors and .json files are read only by
parsers that cannot run code, and a safetensors header can start like a pickle, so they are never
sniffed. Standard library only: the registry uses it without importing torch.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from typing import IO

from DiffSegCore.errors import ModelError
from DiffSegCore.models.intake import Member

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
PARSED_SUFFIXES = (".safetensors", ".json")

def _pickled_stream(stream: IO[bytes]) -> bool:
    """True for a pickle stream (protocol 2-5) and for torch's zip checkpoint (a zip holding a .pkl)."""
    head = stream.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head != b"PK\x03\x04":
        return False
    stream.seek(0)
    try:
        with zipfile.ZipFile(stream) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def is_pickled(name: str, open_file: Callable[[], IO[bytes]]) -> bool:
    """Whether the file `name` holds (or by its name claims to hold) pickled data."""
    lowered = name.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        return True
    if lowered.endswith(PARSED_SUFFIXES):
        return False
    with open_file() as stream:
        return _pickled_stream(stream)


def refuse_pickles(members: Iterable[Member], where: str) -> None:
    """Raise ModelError for the first pickled member (intake's checked listing) of the bundle shown as `where`."""
    for member in members:
        name = member.name
        if is_pickled(name, member.open):
            raise ModelError(
                f"{name} in {where} holds pickled weights, which DiffSeg never loads (unpickling can run code); "
                'convert them: python -c "import torch, safetensors.torch as st; '
                f"st.save_file(torch.load('{PurePosixPath(name).name}', weights_only=True), 'diffusion.safetensors')\""
            )
