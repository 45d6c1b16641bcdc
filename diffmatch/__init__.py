"""DiffMatch: semi-supervised change detection guided by vision-language-model pseudo labels."""

__version__ = "0.1.0"
