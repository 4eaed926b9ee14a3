"""grain data pipelines: sources (files, TFDS), formats, chat templates, loss masks, packing.

See docs/DATA.md for the batch contract and configuration."""
from medjax.data.formats import FieldError, Rendered, Renderer
from medjax.data.pipeline import (DataIterator, build_dataset, make_dataset, packing_efficiency,
                                  resolve_sources)
from medjax.data.sources import DataError, SkipLog

__all__ = ["DataError", "DataIterator", "FieldError", "Rendered", "Renderer", "SkipLog", "build_dataset",
           "make_dataset", "packing_efficiency", "resolve_sources"]
