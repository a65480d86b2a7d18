"""``python -m slimnet.export ...``: the documented command line, run by ``slimnet.deploy.export.main``."""

import sys

from slimnet.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
