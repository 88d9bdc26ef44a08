"""``python -m retouch.cli``: the ``retouch`` command line."""

import sys

from retouch.cli import main

sys.exit(main())
