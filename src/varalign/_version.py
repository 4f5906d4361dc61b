"""The package version, in one place (the package face and every manifest import it from here)."""

__version__ = "0.1.0"
