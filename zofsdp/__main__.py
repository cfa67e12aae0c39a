import sys

from zofsdp.cli import main

sys.exit(main())
