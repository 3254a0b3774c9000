"""Modules users put in their models."""
from .attention import ChannelAttention, DualAttention, PositionAttention
from .information_bottleneck import InformationBottleneckHead, information_bottleneck_kl

__all__ = [
    "ChannelAttention",
    "DualAttention",
    "PositionAttention",
    "InformationBottleneckHead",
    "information_bottleneck_kl",
]
