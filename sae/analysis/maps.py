"""Latent-space maps: t-SNE (scikit-learn) and UMAP (umap-learn) of latent codes or decoder
directions, coloured by operation, answer or an input. Both are seeded for reproducible figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

METHODS = ("tsne", "umap")


def embed_2d(points: torch.Tensor, method: str = "tsne", seed: int = 0, neighbours: int = 15) -> np.ndarray:
    """points: [n, d] -> [n, 2]. neighbours: UMAP's n_neighbors, and t-SNE's perplexity (capped below n)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    x = points.detach().float().cpu().numpy()
    if x.ndim != 2 or len(x) < 4:
        raise ValueError(f"embed_2d needs [n >= 4, d] points, got shape {tuple(x.shape)}")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(neighbours * 2, len(x) - 1) / 2)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    import umap

    return umap.UMAP(n_neighbors=min(neighbours, len(x) - 1), random_state=seed, n_jobs=1).fit_transform(x)


def plot_map(coords: np.ndarray, colour: np.ndarray | torch.Tensor, path: str | Path, title: str = "",
             colour_label: str = "", categories: list[str] | None = None) -> Path:
    """Scatter of a 2-D map. categories: names of integer colour codes (a legend instead of a colour bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = colour.cpu().numpy() if isinstance(colour, torch.Tensor) else np.asarray(colour)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if categories is not None:
        for code, name in enumerate(categories):
            chosen = colour == code
            ax.scatter(coords[chosen, 0], coords[chosen, 1], s=4, label=name)
        ax.legend(markerscale=3, fontsize="small")
    else:
        scatter = ax.scatter(coords[:, 0], coords[:, 1], c=colour, s=4, cmap="twilight")
        fig.colorbar(scatter, ax=ax, label=colour_label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
