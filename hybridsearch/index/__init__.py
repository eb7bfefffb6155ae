"""The hybrid index: segments on disk, a versioned manifest, and the HybridIndex API."""
