import sys

from zlocal.cli import main

sys.exit(main())
