import sys

from splitgate.cli import main

sys.exit(main())
