"""palp: Prompt Aligned Personalization of text-to-image models (Arar et al., 2024)."""

__version__ = "0.1.0"
