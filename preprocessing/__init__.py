"""Turning photos into per-resolution LMDBs: sources, MTCNN, alignment, pyramid, storage."""
