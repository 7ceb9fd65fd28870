"""Replaces the hand-made test graphs with a real trained CNN: trains a small digits
classifier and writes `digits_cnn.onnx` and `digits.npz` beside this script.

A development script, never imported by tailor: it needs torch and scikit-learn
(`pip install -e .[dev]`). The data is scikit-learn's bundled copy of the UCI optical
digits (1,797 8x8 images read from a file inside the scikit-learn wheel; nothing is
downloaded). Images are scaled to [0, 1], upsampled 2x (bilinear) to 16x16 and
standardised with the training set's mean and standard deviation; the `.npz` holds them
already preprocessed.

The network has the structure tailor's passes are written for: Conv-BN-ReLU blocks, a
residual block (Add), a depthwise-separable block, global average pooling, Flatten and a
two-layer classifier with Dropout. It is exported in inference mode with its
BatchNormalization nodes kept, so `fuse` has real work to do (Dropout is an identity in
inference, and the exporter leaves it out).

Usage::

    python examples/make_digits_cnn.py [--out-dir examples] [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

__all__ = ["DigitsCNN", "load_data", "train", "export", "main"]

logger = logging.getLogger(__name__)

MODEL_NAME = "digits_cnn.onnx"
DATA_NAME = "digits.npz"
#: Side of the network's input. The 8x8 originals leave a 2x2 map after two stride-2
#: stages, where a 3x3 conv is mostly padding and pooling averages four pixels; at 16x16
#: every stage keeps a realistic spatial extent (16, 8, 4) for pruning, factorization
#: and per-layer latency to act on.
SIDE = 16
TEST_FRACTION = 0.2
CALIB_SIZE = 256
THREADS = 2


def _conv_bn(cin: int, cout: int, *, stride: int = 1, kernel: int = 3, groups: int = 1):
    # No conv bias: the BatchNormalization that follows has its own shift (the usual layout).
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 Conv-BN with an identity shortcut: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class DigitsCNN(nn.Module):
    """The bundled example network (1x16x16 -> 10 logits).

    stem Conv-BN-ReLU 1->16 (16x16), Conv-BN-ReLU 16->32 stride 2 (8x8), a residual block
    of two 32->32 convs, a depthwise-separable block (3x3 depthwise stride 2, then 1x1
    32->64; 4x4), GlobalAveragePool, Flatten, Linear(64, 64), ReLU, Dropout, Linear(64, 10).
    """

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.stem = _conv_bn(1, 16)
        self.down = _conv_bn(16, 32, stride=2)
        self.res = ResidualBlock(32)
        self.dw = _conv_bn(32, 32, stride=2, groups=32)
        self.pw = _conv_bn(32, 64, kernel=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 64)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        x = self.res(x)
        x = F.relu(self.pw(F.relu(self.dw(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def load_data(seed: int) -> dict[str, np.ndarray | float]:
    """The preprocessed split: train/test images (N,1,16,16 float32), labels (int64).

    Returns a dict with `train_x`, `train_y`, `test_x`, `test_y`, and the `mean` and `std`
    used to standardise (computed on the training images only).
    """
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel counts 0..16 -> [0, 1]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )

    def upsample(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).unsqueeze(1)
        return F.interpolate(t, size=(SIDE, SIDE), mode="bilinear", align_corners=False).numpy()

    train_x, test_x = upsample(train_x), upsample(test_x)
    mean, std = float(train_x.mean()), float(train_x.std())
    return {
        "train_x": ((train_x - mean) / std).astype(np.float32),
        "train_y": train_y,
        "test_x": ((test_x - mean) / std).astype(np.float32),
        "test_y": test_y,
        "mean": mean,
        "std": std,
    }


def _accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(predict(x), axis=1) == y))


def train(data: dict, *, epochs: int, seed: int) -> DigitsCNN:
    """Trains deterministically (fixed seeds, deterministic kernels, fixed thread count)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    x = torch.from_numpy(data["train_x"])
    y = torch.from_numpy(data["train_y"])
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            # Random shifts of up to one pixel (of 16): the 1,437 training images are few.
            xb = torch.roll(
                x[idx],
                shifts=tuple(torch.randint(-1, 2, (2,), generator=generator).tolist()),
                dims=(2, 3),
            )
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(x))
    return model.eval()


def export(model: DigitsCNN, metadata: dict[str, str]) -> onnx.ModelProto:
    """The ONNX model in inference mode, BatchNormalization kept, dynamic batch."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (dynamo=False): it keeps
        # BatchNormalization as its own node; its deprecation notice is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            torch.zeros(1, 1, SIDE, SIDE),
            buffer,
            dynamo=False,
            # PRESERVE on an eval() model exports inference mode without folding BN into Conv.
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = "Digits CNN (scikit-learn load_digits, 16x16), the bundled tailor example"
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _ort_predict(proto: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    # A crash half-way never leaves a truncated file where the tests and users look.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are shipped and read by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """Trains, verifies the export in onnxruntime, writes both files, prints the accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    data = load_data(args.seed)
    model = train(data, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        torch_acc = _accuracy(
            lambda x: model(torch.from_numpy(x)).numpy(), data["test_x"], data["test_y"]
        )

    metadata = {
        "producer": "tailor examples/make_digits_cnn.py",
        "dataset": (
            "scikit-learn load_digits (copy of the UCI Optical Recognition of Handwritten "
            f"Digits test set, 1797 images); stratified {1 - TEST_FRACTION:.0%}/"
            f"{TEST_FRACTION:.0%} train/test split, seed {args.seed}"
        ),
        "preprocessing": (
            f"x = (bilinear_resize(pixels / 16, {SIDE}x{SIDE}) - {data['mean']:.6f}) "
            f"/ {data['std']:.6f}"
        ),
        "input": f"input: float32 [batch, 1, {SIDE}, {SIDE}]",
        "labels": "digits 0-9, logits in that order",
        "test_samples": str(len(data["test_y"])),
        "training": f"{args.epochs} epochs, AdamW, one-cycle lr 3e-3, seed {args.seed}",
        "torch_version": torch.__version__,
        "sklearn_version": sklearn.__version__,
    }
    proto = export(model, metadata)
    onnx_acc = _accuracy(_ort_predict(proto), data["test_x"], data["test_y"])
    if abs(onnx_acc - torch_acc) > 1.0 / len(data["test_y"]):
        raise RuntimeError(
            f"the exported model scores {onnx_acc:.4f} in onnxruntime but {torch_acc:.4f} in torch"
        )
    # The stated accuracy is the ONNX model's, as onnxruntime computes it: what users see.
    proto.metadata_props.add(key="test_accuracy", value=f"{onnx_acc:.4f}")

    rng = np.random.default_rng(args.seed)
    calib = rng.choice(len(data["train_x"]), size=CALIB_SIZE, replace=False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path, data_path = args.out_dir / MODEL_NAME, args.out_dir / DATA_NAME
    _write_atomic(model_path, lambda f: f.write(proto.SerializeToString()))
    _write_atomic(
        data_path,
        lambda f: np.savez_compressed(
            f,
            calib_x=data["train_x"][np.sort(calib)],
            test_x=data["test_x"],
            test_y=data["test_y"],
        ),
    )
    print(
        f"trained in {seconds:.1f} s; test accuracy {onnx_acc:.4f} "
        f"({len(data['test_y'])} images, torch {torch_acc:.4f})"
    )
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes)")
    print(f"wrote {data_path} ({data_path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
