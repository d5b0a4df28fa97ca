"""``python -m fusionlib``: the ``fusionlib`` command (run / sweep / report), see :mod:`fusionlib.cli`."""
import sys

from fusionlib.cli import main

if __name__ == "__main__":
    sys.exit(main())
