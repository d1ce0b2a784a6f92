"""Conformance suites shipped with kvtier: a serde or an L2 adapter passes by subclassing one.

Example, in a third-party package's tests::

    from kvtier.testing import SerdeTests

    class TestMySerde(SerdeTests):
        config = {"type": "mine"}

    from kvtier.testing import L2AdapterTests

    class TestMyAdapter(L2AdapterTests):
        def adapter_config(self, tmp_path, capacity_gb=None):
            return {"type": "mine", **({"max_capacity_gb": capacity_gb} if capacity_gb else {})}
"""

from kvtier.testing.adapters import L2AdapterTests
from kvtier.testing.serde import SerdeTests

__all__ = ["L2AdapterTests", "SerdeTests"]
