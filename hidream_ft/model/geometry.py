"""The model's patch geometry, importable without torch (the configuration checks sizes against it)."""

PATCH_SIZE = 32  # pixels per patch side: image sides must be multiples of it
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE  # values per patch token (RGB)
