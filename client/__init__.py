"""kvcodec.client."""
