"""Data for the zebra stages: packed token mixtures (SFT chat data) and preference pairs.

    from zebra.data import TokenMixtureDataModule, PreferenceDataModule

Both default to data shipped in `zebra/data/shipped/` (written for this project) and to the embedded
SmolLM2-135M-Instruct tokenizer, so they work offline out of the box.
"""

from .formatting import CHAT_TEMPLATES, REFERENCE_TEMPLATE, format_conversation, format_conversations
from .preference import PreferenceDataModule
from .sft import TokenMixtureDataModule
from .sources import SHIPPED_DIR, shipped_path

__all__ = [
    "CHAT_TEMPLATES",
    "REFERENCE_TEMPLATE",
    "SHIPPED_DIR",
    "PreferenceDataModule",
    "TokenMixtureDataModule",
    "format_conversation",
    "format_conversations",
    "shipped_path",
]
