"""`python -m tailor`: the same as the `tailor` command."""

from __future__ import annotations

import sys

from tailor.cli import main

sys.exit(main())
