"""`python -m functions.stream`: the stream Service as deployed (the app and the tracker)."""

import sys

from functions.stream.app import main

sys.exit(main())
