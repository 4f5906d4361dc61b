"""varalign: select CLIP pretraining data with VAS, VAS-D and CLIP-score filtering."""

__version__ = "0.1.0"

from .errors import VaralignError  # noqa: E402
from .filter import METHODS, FilterResult, FilterSpec, filter_pool  # noqa: E402
from .scores.vas import vas_scores  # noqa: E402
from .select import at_least, datacomp_threshold, top_k_mask  # noqa: E402
from .target import SecondMoment, load_target  # noqa: E402
from .uids import hex_to_uids, load_subset, save_subset, uids_to_hex  # noqa: E402

__all__ = [
    "METHODS", "FilterResult", "FilterSpec", "SecondMoment", "VaralignError", "at_least",
    "datacomp_threshold", "filter_pool", "hex_to_uids", "load_subset", "load_target", "save_subset",
    "top_k_mask", "uids_to_hex", "vas_scores",
]
