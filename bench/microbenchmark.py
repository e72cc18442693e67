"""Ray's microbenchmark rows on latticaray, beside Ray 2.60's figures on this machine.

Run: `.venv/bin/python bench/microbenchmark.py [--duration 2] [--only "tasks"]`. The last line
of output is one JSON object with the figures, the machine and the versions.
"""

import sys

from latticaray.runtime.microbenchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
