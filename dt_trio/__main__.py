"""`python -m dt_trio`: the sidecar command."""

import sys

from dt_trio._cli import main

sys.exit(main())
