"""Notebooks run by the test suite (nbmake) run in their quick mode.

SPO_MIN_QUICK=1 reaches each notebook's kernel through the environment (nbmake starts the kernel
as a child of this process). A notebook that trains reads it and uses smaller settings, with
every assert still executed; a reader who opens the notebook, where the variable is unset, gets
the full version. `SPO_MIN_QUICK=0 python -m pytest notebooks/` runs the full versions instead.
"""

import os

os.environ.setdefault("SPO_MIN_QUICK", "1")
