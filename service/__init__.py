"""kvcodec.service."""
