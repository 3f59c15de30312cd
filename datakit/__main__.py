import sys

from datakit.cli import main

sys.exit(main())
