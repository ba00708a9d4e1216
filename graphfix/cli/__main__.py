"""``python -m graphfix.cli``."""

import sys

from graphfix.cli.app import main

sys.exit(main())
