"""The strategy's knobs: :class:`SecAggConfig` lives with the round driver that reads
them (:mod:`sgs_flower.driver.config`, no Flower there); this name stays for users."""

from sgs_flower.driver.config import SecAggConfig

__all__ = ["SecAggConfig"]
