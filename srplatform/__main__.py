import sys

from srplatform.cli import main

sys.exit(main())
