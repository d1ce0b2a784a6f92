"""Conformance suites shipped with kvtier: a serde (or, later, an L2 adapter) passes by subclassing one.

Example, in a third-party package's tests::

    from kvtier.testing import SerdeTests

    class TestMySerde(SerdeTests):
        config = {"type": "mine"}
"""

from kvtier.testing.adapters import L2AdapterTests
from kvtier.testing.serde import SerdeTests

__all__ = ["L2AdapterTests", "SerdeTests"]
