"""`python -m DiffSegCore` runs the diffseg command (used by the Slicer worker)."""

import sys

from DiffSegCore.cli.main import main

sys.exit(main())
