"""The .moepack format: spec constants, header schema, writer and reader (stdlib + numpy only)."""

from .errors import (
    BadMagicError, ChecksumError, ConfigError, FormatError, HeaderError, LayoutError, MoepackError, SourceError,
    TruncatedFileError, UnsupportedVersionError,
)
from .header import ExpertLayout, Header, ModelConfig, QuantizerInfo, Recipe, TensorEntry, TokenizerInfo
from .qtensor import QuantSpec, decode_matrix, encode_matrix, matrix_layout
from .reader import MoepackFile, open_moepack
from .writer import MoepackWriter, make_expert_layout

__all__ = [
    "BadMagicError", "ChecksumError", "ConfigError", "ExpertLayout", "FormatError", "Header", "HeaderError",
    "LayoutError", "ModelConfig", "MoepackError", "MoepackFile", "MoepackWriter", "QuantSpec", "QuantizerInfo",
    "Recipe", "SourceError", "TensorEntry", "TokenizerInfo", "TruncatedFileError", "UnsupportedVersionError",
    "decode_matrix", "encode_matrix", "make_expert_layout", "matrix_layout", "open_moepack",
]
