"""MoCHA: a vision-language model with MoE connectors and hierarchical group attention."""

__version__ = "0.1.0"
