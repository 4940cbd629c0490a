"""Version stamps written into every saved adapter: which peft_sparse wrote it, and in which layout.

``FORMAT_VERSION`` numbers the layout of a saved adapter (config fields and tensor names/meanings).
Bump it when a change would make an older peft_sparse misread a new adapter; a reader refuses
adapters with a newer format version instead of loading them wrongly. Adapters saved before the
stamp existed are format 1. Format 2 saves a sparse delta's indices as compact gaps and its values in the
config's ``save_dtype`` (:mod:`peft_sparse.sparse.compact_format`); format-1 adapters still load. ``__version__`` is the installed distribution's (``pyproject.toml``'s)
version, read from its metadata.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(distribution: str = "peft-sparse") -> str:
    """The installed version of ``distribution``; ``"0+unknown"`` when it is not installed (a bare source tree).

    Example:
        >>> installed_version("no-such-distribution")
        '0+unknown'
    """
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "0+unknown"


__version__ = installed_version()
FORMAT_VERSION = 2


def check_format_version(format_version, written_by: str | None) -> None:
    """Raise ValueError unless this peft_sparse can read an adapter of ``format_version``.

    Example:
        >>> check_format_version(FORMAT_VERSION, __version__)  # no error
    """
    if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
        raise ValueError(f"format_version must be a positive integer, got {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise ValueError(
            f"format_version {format_version} is newer than this peft_sparse {__version__} can read (up to "
            f"{FORMAT_VERSION}); the adapter was written by peft_sparse {written_by}: upgrade with "
            "`pip install -U peft-sparse`"
        )
