import sys

from .side_by_side import main

sys.exit(main())
