"""Where `filter_pool` used to live; the engine is now `varalign.engine` and each method is a file of
`varalign.methods`. Kept so that `from varalign.filter import filter_pool` still works."""

from .engine import FilterResult, describe_methods, filter_pool

__all__ = ["FilterResult", "describe_methods", "filter_pool"]
