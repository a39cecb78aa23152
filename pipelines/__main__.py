"""``python -m pipelines``: the full ``palp`` command (the library's commands and ``palp pipeline``)."""

import sys

from pipelines.cli import main

sys.exit(main())
