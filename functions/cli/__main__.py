"""`python -m functions.cli`: the `dockyard` command."""

import sys

from functions.cli.main import main

sys.exit(main())
