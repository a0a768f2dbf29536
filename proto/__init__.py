"""kvcodec.proto."""
