import sys

from eval_suite.cli import main

sys.exit(main())
