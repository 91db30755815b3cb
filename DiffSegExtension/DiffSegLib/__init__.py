"""DiffSeg Slicer module internals: scene bridge, background worker, logic, dependency install."""
