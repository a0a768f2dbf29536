"""kvcodec.store."""
