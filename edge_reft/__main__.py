import sys

from edge_reft.services.cli import main

sys.exit(main())
