"""rtdeface: deface and de-identify head-and-neck radiotherapy DICOM in patient coordinates.

The public entry points are :func:`rtdeface.pipeline.deface_case` (library) and the
``rtdeface`` command line (:func:`rtdeface.cli.main`).
"""

from __future__ import annotations

import logging

__version__ = "0.2.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
