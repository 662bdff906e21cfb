import sys

from lookwhen.cli.main import main

sys.exit(main())
