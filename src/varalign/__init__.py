"""varalign: select CLIP pretraining data with VAS, VAS-D and CLIP-score filtering."""

from ._version import __version__
from .engine import FilterOptions, FilterResult, filter_pool
from .errors import VaralignError
from .methods import NAMES
from .scores.vas import vas_scores
from .select import at_least, datacomp_threshold, top_k_mask
from .target import SecondMoment, load_target
from .uids import hex_to_uids, load_subset, save_subset, uids_to_hex

__all__ = [
    "NAMES", "FilterOptions", "FilterResult", "__version__", "SecondMoment", "VaralignError", "at_least",
    "datacomp_threshold", "filter_pool", "hex_to_uids", "load_subset", "load_target", "save_subset",
    "top_k_mask", "uids_to_hex", "vas_scores",
]
