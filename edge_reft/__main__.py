import sys

from edge_reft.cli import main

sys.exit(main())
