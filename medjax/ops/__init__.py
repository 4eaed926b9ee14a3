"""Pure array functions (no modules, no medjax imports)."""
from medjax.ops.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
