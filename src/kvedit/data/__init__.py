"""Edit requests, dataset loaders and the built-in demo facts."""

from .loaders import (
    SUPPORTED_FORMATS,
    DatasetError,
    load_counterfact,
    load_easyedit_counterfact,
    load_requests,
    load_zsre,
)
from .requests import EditRequest, RequestError

__all__ = [
    "EditRequest",
    "RequestError",
    "DatasetError",
    "SUPPORTED_FORMATS",
    "load_counterfact",
    "load_easyedit_counterfact",
    "load_requests",
    "load_zsre",
]
