"""The panel's settings, kept on the module's parameter node (a vtkMRMLScriptedModuleNode) and saved with the scene.

Plain MRML (parameters and node references), no Qt: the same code runs in Slicer and on a
slicer-core scene. Run settings keep settings.py's names, defaults and checks.
"""

from __future__ import annotations

from typing import Any

from DiffSegCore.settings import BY_NAME

# Node references: input channels, the pre-segmentation to start from, the outputs.
NODE_ROLES = (
    "inputVolume",
    "channel2Volume",
    "channel3Volume",
    "presegSegmentation",
    "outputSegmentation",
    "outputUncertainty",
)
# Where sampling starts: the core's sources plus a segmentation node of the scene.
PRESEG_CHOICES = {
    "none": "Noise (no pre-segmentation)",
    "model": "The model's pre-segmentation network",
    "segmentation": "An existing segmentation",
}
# Plain values and their defaults (settings.py's where it has one; T' is the model's, 0 until one is chosen).
VALUES: dict[str, Any] = {
    "model": "",
    "steps": BY_NAME["steps"].default,
    "ensemble": BY_NAME["ensemble"].default,
    "sampler": BY_NAME["sampler"].default,
    "preseg": "none",
    "preseg_step": 0,
    "device": BY_NAME["device"].default,
    "seed": BY_NAME["seed"].default,
    "max_memory": 0.0,  # GiB; 0 = automatic (settings.py's None: the planner's share of the free memory)
    "saveMembers": False,
}


def _decode(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        return text == "true"
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def _encode(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _checked(name: str, value: Any) -> Any:
    if name == "preseg":
        if value not in PRESEG_CHOICES:
            raise ValueError(f"preseg must be one of {', '.join(PRESEG_CHOICES)}, not {value!r}")
        return value
    if name == "max_memory" and value == 0:
        return 0.0  # automatic
    return BY_NAME[name].check(value) if name in BY_NAME else type(VALUES[name])(value)


class Parameters:
    """Typed attribute access to a parameter node: `p.steps`, `p.inputVolume = node`.

    Values are checked as settings.py checks them before they are stored.
    """

    def __init__(self, node) -> None:
        object.__setattr__(self, "node", node)

    def __getattr__(self, name: str) -> Any:
        if name in NODE_ROLES:
            return self.node.GetNodeReference(name)
        if name in VALUES:
            text = self.node.GetParameter(name)
            return _decode(text, VALUES[name]) if text else VALUES[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in NODE_ROLES:
            self.node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif name in VALUES:
            self.node.SetParameter(name, _encode(_checked(name, value)))
        else:
            raise AttributeError(f"the DiffSeg parameter node has no field {name}")
