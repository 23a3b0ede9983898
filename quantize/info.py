"""Versions recorded in every file's header (QuantizerInfo)."""

from __future__ import annotations

from importlib import metadata


def _version(dist: str, fallback: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return fallback


def package_version() -> str:
    # an uninstalled checkout (PYTHONPATH=.) has no metadata; the fallback says so
    return _version("moe-pack", "0+unknown")


def hqq_version() -> str:
    return _version("hqq", "unknown")
