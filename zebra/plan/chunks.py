"""How many rows of [rows, vocab] fp32 logits one chunk of a vocabulary-sized matmul holds: the KD loss, the
held-out metrics and the memory estimate all chunk by this rule, so what `describe` plans is what runs."""

from __future__ import annotations

# elements of one chunk's fp32 logits: ~256 MB, i.e. 512 rows at a 128k vocabulary, 1024 at SmolLM2's 49k
CHUNK_ELEMENTS = 1 << 26


def chunk_rows(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per logits chunk: the largest power of two (friendlier matmul shapes) with at most about
    `chunk_elements` values, and at least one row."""
    n = max(1, int(chunk_elements) // max(1, int(vocab_size)))
    return 1 << (n.bit_length() - 1)
