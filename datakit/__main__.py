import gc
import sys

from datakit.cli import main

code = main()
# Everything is written and closed by now. With what is alive frozen, the interpreter's exit
# skips collecting the object graphs of Ray, pandas and pyarrow it would free a moment later
# anyway: 0.36 -> 0.07 s from the end of main to exit (measured).
gc.freeze()
sys.exit(code)
