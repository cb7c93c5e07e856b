import sys

from neonctl.cli import main

sys.exit(main())
