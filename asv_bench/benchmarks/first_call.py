"""First-call costs, each in a fresh interpreter: import, compile, load from cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

_CALL = """
import numpy as np, numbabn
numbabn.batch_norm(np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5), training=True)
"""


def timeraw_import_numbabn():
    return "import numbabn"


class FirstCall:
    """Compile with an empty numba cache, then load from the warm cache."""

    timeout = 600
    repeat = 3
    number = 1

    def setup(self):
        self.cache = tempfile.mkdtemp(prefix="numbabn-asv-cache-")
        env = dict(os.environ, NUMBA_CACHE_DIR=self.cache)
        subprocess.run([sys.executable, "-c", _CALL], env=env, check=True)  # fill the cache

    def teardown(self):
        shutil.rmtree(self.cache, ignore_errors=True)

    def timeraw_compile_cold_cache(self):
        cache = tempfile.mkdtemp(prefix="numbabn-asv-cold-")
        return f"import os; os.environ['NUMBA_CACHE_DIR'] = {cache!r}\n" + _CALL

    def timeraw_warm_cache(self):
        return f"import os; os.environ['NUMBA_CACHE_DIR'] = {self.cache!r}\n" + _CALL
