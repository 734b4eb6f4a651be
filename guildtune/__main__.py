"""``python -m guildtune``: the same as the ``guildtune`` command."""

import sys

from .cli import main

sys.exit(main())
