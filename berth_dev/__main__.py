"""`python -m berth_dev` (`make run`): the local stack, see berth_dev.stack."""

from __future__ import annotations

import sys

from berth_dev import stack

if __name__ == "__main__":
    sys.exit(stack.main())
