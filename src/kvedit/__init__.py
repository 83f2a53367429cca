"""kvedit: locate, inspect, edit and tune the key-value memories of transformer FFN layers."""

__version__ = "0.1.0"
