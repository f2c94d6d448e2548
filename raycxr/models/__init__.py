"""Models: the image encoder, Ark (student-teacher with per-site heads) and UniChest (query networks)."""
