"""Make ``sss_lib`` importable both from an installed extension and from the source tree.

Installed, ``sss_lib/`` sits in ``qt-scripted-modules/`` next to ``SSSSegment.py``; Slicer already
put that folder on ``sys.path`` when it registered the module. From the source tree (Slicer started
with ``--additional-module-paths <repo>/SSSSegment``) the package is at ``<repo>/sss_lib`` instead,
so the repository root must be added.
"""

import os
import sys
from typing import Optional


def ensure_sss_lib_importable(module_dir: str) -> Optional[str]:
    """Add the folder holding ``sss_lib`` to ``sys.path`` if needed; return that folder (or None)."""
    for candidate in (module_dir, os.path.dirname(os.path.abspath(module_dir))):
        if os.path.isfile(os.path.join(candidate, "sss_lib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.append(candidate)
            return candidate
    return None
