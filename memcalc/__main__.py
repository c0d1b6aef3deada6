import sys

from memcalc.cli import main

sys.exit(main())
