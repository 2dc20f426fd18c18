"""`python -m appliance` is the same as the `appliance` console script."""

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
