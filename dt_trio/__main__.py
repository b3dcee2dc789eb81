"""`python -m dt_trio`: the dt-trio command."""

import sys

from dt_trio._entry import main

sys.exit(main())
