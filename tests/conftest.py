import os
import sys
import tempfile
from pathlib import Path

# Tests never reach a hub; everything is built on the fly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# converter.cache: one fresh cache per test session, never the user's
os.environ.setdefault("CONVERTER_CACHE_DIR", tempfile.mkdtemp(prefix="converter-cache-"))
sys.path.insert(0, str(Path(__file__).parent))

# Ray in tests: loopback only, no usage stats, no auth. Ray turns "127.0.0.1" in an address
# into the machine's own IP when connecting unless clusters are "disabled" this way, which
# makes it resolve the local address to 127.0.0.1 everywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
