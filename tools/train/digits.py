"""The digits dataset (scikit-learn's 1797 handwritten 8x8 digits, shipped inside the package, no download) at the
models' resolution, and the small classifier the quality metrics use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RESOLUTION = 16


def load_digit_images(size: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """-> (images float32 (N, 1, size, size) in [-1, 1], labels int64 (N,)). Bilinear upsampling of the 8x8 data."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("the digits dataset needs scikit-learn: pip install 'keystep[train]'") from exc
    import torch
    from torch.nn import functional as F

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.numpy() * 2 - 1).astype(np.float32), data.target.astype(np.int64)


def classifier_module():
    from torch import nn

    class DigitClassifier(nn.Module):
        """(N, 1, 16, 16) in [-1, 1] -> (logits (N, 10), features (N, 64)); features feed digits-FD."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
            )
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            features = self.body(x)
            return self.head(features), features

    return DigitClassifier()


def train_classifier(out_dir, epochs: int = 30, seed: int = 0, progress=print) -> float:
    """Train on 80 % of the digits (random shifts and noise as augmentation), export to ONNX next to the real set's
    feature statistics (for digits-FD), return the held-out accuracy."""
    import torch
    from torch.nn import functional as F

    torch.manual_seed(seed)
    images, labels = load_digit_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train, held = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model = classifier_module()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        for batch in np.array_split(rng.permutation(train), max(1, len(train) // 64)):
            xb = x[batch]
            shift = rng.integers(-1, 2, 2)
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            xb = (xb + 0.1 * torch.randn_like(xb)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb)[0], y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[held])[0].argmax(1) == y[held]).float().mean())
        features = model(x)[1].double().numpy()
    progress(f"classifier: held-out accuracy {accuracy:.4f}")
    out_dir = Path(out_dir)
    np.savez(out_dir / "digits-real-features.npz", mean=features.mean(0), cov=np.cov(features, rowvar=False))
    torch.onnx.export(model, (x[:2],), str(out_dir / "digits-classifier.onnx"), input_names=["image"],
                      output_names=["logits", "features"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                      dynamo=True, external_data=False)
    return accuracy


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="train the digit classifier used by the quality metrics")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    train_classifier(args.out, args.epochs)
