"""Every serde that ships with kvtier passes the shared conformance suite from its JSON config."""

import os

import torch

from kvtier.serde import registered_serdes
from kvtier.serde.builtin import BUILTIN_SERDES
from kvtier.testing import SerdeTests

os.environ.setdefault("KVTIER_REGISTERED_TEST_KEY", "0f" * 32)

#: one JSON config per built-in serde (a new built-in without one fails test_every_builtin_is_covered)
EXAMPLES = {
    "raw": {"type": "raw"},
    "fp8": {"type": "fp8", "fp8_dtype": "float8_e5m2", "scale": "group", "block": 64},
    "lz4": {"type": "lz4", "level": 3, "shuffle": True},
    "zstd": {"type": "zstd", "level": -1},
    "aesgcm": {"type": "aesgcm", "key_env": "KVTIER_REGISTERED_TEST_KEY", "key_bits": 256},
    "checksum": {"type": "checksum", "algorithm": "xxh3_64"},
}
LOSSY = {"fp8": 0.13}


def test_every_builtin_is_covered() -> None:
    assert set(BUILTIN_SERDES) == set(EXAMPLES)
    assert set(EXAMPLES) <= set(registered_serdes())


def _suite(name: str) -> type[SerdeTests]:
    attrs = {"config": EXAMPLES[name], "dtypes": (torch.bfloat16, torch.float32)}
    if name in LOSSY:
        attrs.update(lossless=False, max_rel_error=LOSSY[name])
    return type(f"TestRegistered_{name}", (SerdeTests,), attrs)


for _name in EXAMPLES:
    globals()[f"TestRegistered_{_name}"] = _suite(_name)

# The whole chain binds to the record context through its last stage.
TestRegisteredChain = type(
    "TestRegisteredChain",
    (SerdeTests,),
    {
        "config": [EXAMPLES["fp8"], EXAMPLES["zstd"], EXAMPLES["checksum"], EXAMPLES["aesgcm"]],
        "lossless": False,
        "max_rel_error": 0.13,
        "dtypes": (torch.bfloat16,),
    },
)
