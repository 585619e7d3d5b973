"""Checkpoint formats: streaming safetensors / PyTorch `.bin` reading and safetensors writing
(`safetensors_io`), the strict rule-table conversion engine (`loading`) and its inverse (`export`).

It knows formats, keys and shapes, nothing of models: the rule tables live with each model family
(`dspark_jax/models/<family>/checkpoint.py`), and `dspark_jax` drives the conversion. Imports go one way:
`dspark_jax` uses `converters`, never the reverse.
"""

from converters.errors import FormatError

__all__ = ["FormatError"]
