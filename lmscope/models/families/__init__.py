"""Architecture families, one file each, composed from :mod:`lmscope.models.parts`."""

from lmscope.models.families.catalog import ADAPTERS, adapter_for

__all__ = ["ADAPTERS", "adapter_for"]
