"""DiffSegCore: diffusion-model segmentation of 3D medical images with uncertainty.

Pure Python (torch, MONAI, SimpleITK, numpy); never imports Slicer, Qt or VTK.
"""

__version__ = "0.1.0"
