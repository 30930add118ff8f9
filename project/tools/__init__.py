"""Extras a fork may delete without touching the core: export, compression, distillation, reading runs back."""
