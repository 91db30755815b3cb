"""The README's picture of the panel (docs/images/panel.png), taken from the real panel in a real state.

DiffSeg.py and Resources/UI/DiffSeg.ui run offscreen through Testing/slicer_adapter.py (PySide6
underneath; the CTK/MRML widgets are drawn by its stand-ins) on a real MRML scene holding the
bundled sample volume. The first model is chosen as the panel does on opening, so its own defaults,
channel names and description are what the picture shows; then it segments the sample with those
defaults, so the Review section shows the run's own figures. Rerun it after changing the panel:

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/panel_image.py [--output PATH] [--no-run]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "DiffSegExtension"), str(ROOT)]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
WIDTH = 460  # about the width of Slicer's module panel
RUN_TIMEOUT_S = 600


def open_panel(standalone):
    """The module's widget as Slicer builds it when the user opens DiffSeg."""
    import DiffSeg

    widget = DiffSeg.DiffSegWidget()
    widget.setup()
    widget.parent.show()
    widget.parent.isEntered = True
    widget.enter()
    return widget


def segment_with_defaults(widget) -> None:
    """Apply with the chosen model's defaults, on the CPU (any machine can rerun it), and wait for the end."""
    import slicer

    widget._parameterNode.device = "cpu"
    widget.ui.applyButton.click()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while widget._running():
        slicer.app.processEvents()
        time.sleep(0.05)
        if time.monotonic() > deadline:
            raise SystemExit("error: the sample run did not end; run the tests to see why")
    if widget._run.state != "done":
        raise SystemExit(f"error: the sample run failed: {widget._run.error}")


def slicer_app_events() -> None:
    import slicer

    slicer.app.processEvents()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "panel.png")
    parser.add_argument("--no-run", action="store_true", help="picture the panel before a run (no Review figures)")
    args = parser.parse_args()
    from DiffSegLib.scene import StandaloneScene

    from DiffSegCore.resources import resource_path
    from Testing import slicer_adapter

    standalone = StandaloneScene()
    slicer_adapter.install(standalone)
    try:
        sample = sorted(resource_path("SampleData").glob("*.nii.gz"))[0]
        standalone.load_volume(sample)
        widget = open_panel(standalone)
        if not args.no_run:
            segment_with_defaults(widget)
        panel = widget.parent
        panel.resize(WIDTH, panel.sizeHint().height())
        slicer_app_events()
        # Word-wrapped labels need more height at this width than the size hint (taken at another width) gives.
        panel.resize(WIDTH, max(panel.heightForWidth(WIDTH), panel.sizeHint().height()))
        slicer_app_events()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if not panel.grab().save(str(args.output)):
            raise SystemExit(f"error: could not write {args.output}")
        widget.cleanup()
    finally:
        slicer_adapter.uninstall()
    print(f"panel picture written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
