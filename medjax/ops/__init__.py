"""Pure array functions (no modules, no medjax imports outside ops)."""
from medjax.ops.attention import attention, attention_mask, attention_reference

__all__ = ["attention", "attention_mask", "attention_reference"]
