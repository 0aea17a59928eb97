"""The commands: flags -> configurations -> a source, the daemon or a file run; `main` is `umvd-live`.

Only `main` is exported: each command's module is imported when it runs (`apps.cli`), so that
`umvd-live --help` stays fast and pulls in no torch.
"""

from umvd_live.apps.cli import main

__all__ = ["main"]
