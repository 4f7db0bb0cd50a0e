"""Quantised weights and activations: GGML block formats (``blocks``: Q40, Q41, Q80 and their
numpy reference implementations) and the runtime matrix layouts the kernels stream
(``matrices``: Q40Matrix, Q41Matrix, Q80Matrix)."""
from __future__ import annotations

from .blocks import (Q40_BLOCK_BYTES, Q41_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, dequantize_q40, dequantize_q41,
                     dequantize_q80, dequantize_q80_parts, quantize_q40, quantize_q41, quantize_q80,
                     quantize_q80_parts, roundf, split_q40, unpack_nibbles)
from .matrices import (ROW_TILE_MAX_COLS, SLAB_BLOCKS, Q40Matrix, Q41Matrix, Q80Matrix, QuantMatrix,
                       RowTileMatrix, add_offsets, block_sums, pack_row_tiles, rows_per_tile, unpack_row_tiles)

__all__ = [
    "QK", "Q40_BLOCK_BYTES", "Q41_BLOCK_BYTES", "Q80_BLOCK_BYTES",
    "quantize_q40", "dequantize_q40", "split_q40", "unpack_nibbles", "roundf",
    "quantize_q80", "quantize_q80_parts", "dequantize_q80", "dequantize_q80_parts",
    "quantize_q41", "dequantize_q41",
    "SLAB_BLOCKS", "ROW_TILE_MAX_COLS", "rows_per_tile", "pack_row_tiles", "unpack_row_tiles",
    "QuantMatrix", "RowTileMatrix", "Q40Matrix", "Q41Matrix", "Q80Matrix", "block_sums", "add_offsets",
]
