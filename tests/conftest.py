"""Shared test set-up: no test reaches the Hugging Face Hub or a user's cache.

Before huggingface_hub is imported (it reads these into constants at import):
downloads are switched off, and the cache is an empty folder of this session, so
a loader given a hub id finds only what a test put there. The tests of the online
path mock the hub client's download functions. Subprocesses inherit both.
"""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_CACHE = tempfile.mkdtemp(prefix="adt-tests-hf-cache-")
os.environ["HF_HUB_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
