import sys

from dassdp.cli import main

sys.exit(main())
