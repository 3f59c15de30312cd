import sys

from datakit.cli import entry

sys.exit(entry())
