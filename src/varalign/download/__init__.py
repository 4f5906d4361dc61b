"""`varalign download`: a DataComp pool's metadata from the Hub, then its images (or only those of a
subset) with img2dataset; verified, resumable, with a per-outcome report. Needs `varalign[download]`."""

from .run import DownloadOptions, DownloadResult, download, retryable_uids

__all__ = ["DownloadOptions", "DownloadResult", "download", "retryable_uids"]
