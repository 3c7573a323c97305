"""``python -m mpi_easgd.flight RUN_DIR``: each rank's last watched waits side by side, and
the first mismatch among them (:mod:`mpi_easgd.runtime.flight`)."""

import sys

from mpi_easgd.runtime.flight import main

if __name__ == "__main__":
    sys.exit(main())
