"""``python -m shoal.cli``: what ``shoal launch`` starts its client processes with."""

import sys

from shoal.cli import main

sys.exit(main())
