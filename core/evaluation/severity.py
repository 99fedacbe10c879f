"""A pixel-based atrophy-severity estimator for MRI bundles whose real data carries ground truth: ridge
regression of severity on pixels divided by each image's median (which removes the intensity scale).
Used to read the severity of generated images (benchmarks/validate_demo.py, the app's density tab)."""
from __future__ import annotations

import numpy as np


class SeverityEstimator:
    """``fit(images, severity)`` then ``est(images) -> (N,)``; images uint8 (N, H, W, C) in [0, 255]."""

    def __init__(self, lam: float = 100.0):
        self.lam = lam  # ridge penalty

    @staticmethod
    def features(images_u8: np.ndarray) -> np.ndarray:
        x = images_u8.reshape(len(images_u8), -1).astype(np.float64) / 255.0
        return x / np.clip(np.median(x, axis=1, keepdims=True), 1e-3, None)

    def fit(self, images_u8: np.ndarray, severity: np.ndarray) -> "SeverityEstimator":
        """images (N, H, W, C) uint8, severity (N,) float in [0, 1] (finite)."""
        severity = np.asarray(severity, np.float64)
        if severity.shape[0] != len(images_u8) or not np.isfinite(severity).all():
            raise ValueError("severity must be finite, one value per image")
        x = self.features(images_u8)
        self.mu, self.y0 = x.mean(0), float(severity.mean())
        a = x - self.mu
        self.w = np.linalg.solve(a.T @ a + self.lam * np.eye(a.shape[1]), a.T @ (severity - self.y0))
        return self

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        return (self.features(images_u8) - self.mu) @ self.w + self.y0
