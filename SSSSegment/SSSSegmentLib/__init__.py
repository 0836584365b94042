"""GUI-free parts of the SSSSegment module: MRML <-> sss_lib conversions, the link to the SSS service
(shared with SSSTrain) and the runs through it, the panels' busy state, and the dependency check.

Python 3.9 compatible (the module must load, and say what it needs, on Slicer 5.6/5.8). Nothing here
imports ``sss_lib``, ``torch`` or ``qt`` at import time: ``sss_lib`` needs Python 3.10+ and is
imported inside the functions that use it.
"""
