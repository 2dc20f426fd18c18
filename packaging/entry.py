"""The frozen binary's entry point: the same `appliance` command line as the console script."""

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
