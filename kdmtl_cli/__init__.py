"""kdmtl: config-driven knowledge distillation into multi-task students."""

__version__ = "0.1.0"
