"""``python -m malora_fx.cli`` (as ``torchrun -m malora_fx.cli`` needs)."""

import sys

from . import main

sys.exit(main())
