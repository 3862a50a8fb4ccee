"""``python -m numbabn``: the main job; see ``numbabn._bench``."""

import sys

from numbabn._bench import main

sys.exit(main())
