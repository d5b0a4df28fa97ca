"""fusionlib: the library under the fusion course.

One module per technique; notebooks in ``notebooks/`` derive, verify and
measure each one. Submodules are imported on use (``from fusionlib import
fusion``), so ``import fusionlib`` stays cheap.
"""
__version__ = "0.1.0"
