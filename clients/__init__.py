"""Client-side Flower glue: the secure-aggregation mod and mixins."""

from clients.secagg_mod import SecAggClientMixin, secagg_mod

__all__ = ["SecAggClientMixin", "secagg_mod"]
