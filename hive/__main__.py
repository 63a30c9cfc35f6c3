import sys

from hive.cli import main

sys.exit(main())
