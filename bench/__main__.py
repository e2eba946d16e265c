"""Entry point of `python -m bench` (the Makefile's `bench` target)."""

import sys

from bench.cli import main

sys.exit(main())
