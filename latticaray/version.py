"""The package's version: a leaf module (no imports), read by the package and by the mesh's
identify agent string without scanning the installed distributions' metadata."""

__version__ = "0.1.0"
