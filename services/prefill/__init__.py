"""Placeholder: built by a later issue (see ../shared/DESIGN.md)."""
