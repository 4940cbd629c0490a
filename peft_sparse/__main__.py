"""``python -m peft_sparse ...``: see :mod:`peft_sparse.cli`."""

import sys

from .cli import main

sys.exit(main())
