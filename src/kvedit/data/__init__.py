"""Edit requests, dataset loaders and the built-in demo facts."""

from .requests import EditRequest, RequestError

__all__ = ["EditRequest", "RequestError"]
