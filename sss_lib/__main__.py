"""``python -m sss_lib ...``: see :mod:`sss_lib.cli`."""

from sss_lib.cli import main

raise SystemExit(main())
