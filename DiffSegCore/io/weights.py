"""Weights on disk as safetensors (never pickle), written with the permissions a plain open() gives."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> tensor of any shape, on any device) to `path` as one safetensors file.

    Through a plain open(), not safetensors' save_file, which creates its files 0600: a bundle or run
    folder shared on a lab drive must stay readable as the umask allows, like every other output.
    """
    from safetensors.torch import save

    data = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata)
    with open(path, "wb") as stream:
        stream.write(data)
