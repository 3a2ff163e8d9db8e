"""``python -m vas.cli`` is ``vasctl`` (the launcher in vas.cluster uses this form)."""
import sys

from vas.cli.main import main

sys.exit(main())
