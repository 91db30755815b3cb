"""`python -m DiffSegCore` runs the diffseg command (used by the Slicer worker)."""

import sys

from .cli import main

sys.exit(main())
