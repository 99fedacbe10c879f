"""Data in and bundles out: image/NIfTI folders, the build pipeline, the bundle format."""
