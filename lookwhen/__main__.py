import sys

from lookwhen.cli import main

sys.exit(main())
