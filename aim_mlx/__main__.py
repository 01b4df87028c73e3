"""`python -m aim_mlx ...`: the aim-mlx command, where its script is not on PATH."""

import sys

from .command import main

sys.exit(main())
