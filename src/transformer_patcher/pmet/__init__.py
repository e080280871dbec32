"""PMET: precise mass editing of decoder-only LMs (in progress: the key statistics come first)."""

from .covariance import SecondMoment, collect_second_moments, second_moments

__all__ = ["SecondMoment", "collect_second_moments", "second_moments"]
