import sys

from palp.cli import main

sys.exit(main())
