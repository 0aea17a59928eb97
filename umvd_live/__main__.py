"""``python -m umvd_live``: the `umvd-live` command where its script is not on PATH (a virtual
environment not activated, a Windows shell), and how tools and tests start it in a subprocess."""

import sys

from umvd_live.apps.cli import main

sys.exit(main())
