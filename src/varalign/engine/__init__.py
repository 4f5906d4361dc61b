"""The filter engine: `filter_pool` (job.py) runs scan → stages → outputs (run.py); a Selector sees it
through `Context` (context.py); the options that are not a method's are in options.py."""

from .context import Context, Mask
from .job import FilterResult, describe_methods, filter_pool, make_recipe
from .options import FilterOptions

__all__ = ["Context", "FilterOptions", "FilterResult", "Mask", "describe_methods", "filter_pool", "make_recipe"]
