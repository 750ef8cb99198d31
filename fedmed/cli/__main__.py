"""``python -m fedmed.cli``: the same as the ``fedmed`` command.

Guarded so that importing it (the wheel check walks and imports every module) parses no argv.
"""

import sys

from fedmed.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
