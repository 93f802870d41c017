import sys

from loadtest.tools import main

sys.exit(main())
