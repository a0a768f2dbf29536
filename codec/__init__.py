"""kvcodec.codec."""
