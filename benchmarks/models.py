"""Replaces random-weight benchmark models with real trained ones: trains a ResNet-ish and
a VGG-ish CNN on Fashion-MNIST and a 1D CNN on UCI HAPT, reproducibly, exports each to
ONNX and caches it outside the repository.

A benchmark script, never imported by tailor: it needs torch (`pip install -e .[bench]`)
and the offline datasets of benchmarks/data.py. Run from the repository root::

    python -m benchmarks.models [--models resnet,vgg,hapt] [--cache-dir DIR] [--force]

For each model the cache folder (default `~/.cache/tailor-bench`, or `TAILOR_BENCH_CACHE`,
or `--cache-dir`) gets `NAME-KEY/model.onnx`, `NAME-KEY/data.npz` (`calib_x`: 512
training inputs, `test_x`, `test_y`) and `NAME-KEY/meta.json`. KEY hashes this script,
data.py, the model's settings and the torch version, so a change to any of them trains
again and an unchanged model is never trained twice. The baseline accuracies and
provenance go to `benchmarks/results/models.json` (and, by hand, benchmarks/README.md).

Training is deterministic: fixed seeds, `torch.use_deterministic_algorithms(True)`, a
fixed thread count (at most 2: the machine is shared), batches drawn from a seeded
generator. The ONNX export keeps BatchNormalization (inference mode, no constant
folding), so `fuse` has real work to do.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import data as datasets

__all__ = [
    "ModelSpec",
    "SPECS",
    "ResNetish",
    "VGGish",
    "HaptCNN",
    "CachedModel",
    "cache_dir",
    "ensure_model",
    "machine_info",
    "main",
]

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_THREADS = 2
CALIB_SIZE = 512
_HERE = Path(__file__).resolve().parent


def _conv_bn(cin: int, cout: int, *, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    # No conv bias: the BatchNormalization that follows has its own shift.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 Conv-BN and a shortcut (1x1 Conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride=stride)
        self.conv2 = _conv_bn(cout, cout)
        self.shortcut = (
            None if cin == cout and stride == 1 else _conv_bn(cin, cout, stride=stride, kernel=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + skip)


class ResNetish(nn.Module):
    """1x28x28 -> 10: stem 3x3 conv (28x28), four basic blocks (two at 14x14, two at 7x7,
    two with projection shortcuts), global average pooling, one Linear."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), classes: int = 10):
        super().__init__()
        w0, w1, w2 = widths
        self.stem = _conv_bn(1, w0)
        self.blocks = nn.Sequential(
            BasicBlock(w0, w1, 2), BasicBlock(w1, w1), BasicBlock(w1, w2, 2), BasicBlock(w2, w2)
        )
        self.fc = nn.Linear(w2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGish(nn.Module):
    """1x28x28 -> 10: five 3x3 Conv-BN-ReLU in three max-pooled stages (28, 14, 7 -> 3),
    Flatten, Linear-ReLU-Dropout-Linear (the Flatten->Gemm pattern of VGG)."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), classes: int = 10):
        super().__init__()
        w0, w1, w2 = widths
        self.features = nn.Sequential(
            _conv_bn(1, w0),
            nn.ReLU(),
            nn.MaxPool2d(2),
            _conv_bn(w0, w1),
            nn.ReLU(),
            _conv_bn(w1, w1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            _conv_bn(w1, w2),
            nn.ReLU(),
            _conv_bn(w2, w2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(w2 * 9, 256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class HaptCNN(nn.Module):
    """6x128 -> 6 activities: four Conv1d-BN-ReLU (two max-pooled), global average
    pooling, Dropout, Linear."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), classes: int = 6):
        super().__init__()
        w0, w1, w2 = widths

        def block(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [
                nn.Conv1d(cin, cout, k, padding=k // 2, bias=False),
                nn.BatchNorm1d(cout),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *block(6, w0, 7),
            *block(w0, w1, 7),
            nn.MaxPool1d(2),
            *block(w1, w1, 5),
            nn.MaxPool1d(2),
            *block(w1, w2, 3),
        )
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(w2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool1d(self.features(x), 1)
        return self.fc(self.drop(torch.flatten(x, 1)))


@dataclass(frozen=True)
class ModelSpec:
    """What determines a trained model: architecture, data, and the training recipe."""

    name: str
    architecture: str
    dataset: str
    widths: tuple[int, int, int]
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    hflip: bool
    seed: int = 0


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("resnet", "ResNetish", "fashion_mnist", (24, 48, 96), 2, 128, 4e-3, 5e-4, True),
        ModelSpec("vgg", "VGGish", "fashion_mnist", (32, 64, 128), 2, 128, 3e-3, 5e-4, True),
        ModelSpec("hapt", "HaptCNN", "hapt", (32, 64, 128), 15, 64, 3e-3, 1e-3, False),
    )
}
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "ResNetish": ResNetish,
    "VGGish": VGGish,
    "HaptCNN": HaptCNN,
}
_LOADERS: dict[str, Callable[[], datasets.Dataset]] = {
    "fashion_mnist": datasets.load_fashion_mnist,
    "hapt": datasets.load_hapt,
}


@dataclass
class CachedModel:
    """A trained model in the cache: its files and what was measured when it was made."""

    name: str
    folder: Path
    meta: dict

    @property
    def onnx_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def data_path(self) -> Path:
        return self.folder / "data.npz"

    def load_data(self) -> dict[str, np.ndarray]:
        """calib_x, test_x, test_y (read without unpickling)."""
        with np.load(self.data_path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else `$TAILOR_BENCH_CACHE`, else `~/.cache/tailor-bench`."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("TAILOR_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tailor-bench"


def _calib_indices(spec: ModelSpec, train_size: int) -> np.ndarray:
    """The training samples kept as calibration data (sorted, seeded)."""
    rng = np.random.default_rng(spec.seed)
    return np.sort(rng.choice(train_size, size=CALIB_SIZE, replace=False))


def _cache_key(spec: ModelSpec) -> str:
    """Hash of everything that determines the cached files: the spec, the torch version,
    data.py, and the source of the architectures, the training, the export and the
    calibration choice (so editing a docstring elsewhere does not train again)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    digest.update(f"{torch.__version__} {CALIB_SIZE}".encode())
    digest.update(inspect.getsource(datasets).encode())
    for obj in (_conv_bn, BasicBlock, ResNetish, VGGish, HaptCNN, _train, _export, _calib_indices):
        digest.update(inspect.getsource(obj).encode())
    return digest.hexdigest()[:12]


def machine_info() -> dict[str, object]:
    """CPU model, cores and versions: stored with every number so it has a lineage."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    # A crash half-way never leaves a truncated file where a later run would trust it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: object) -> None:
    """Writes indented JSON atomically."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()))


def _train(spec: ModelSpec, data: datasets.Dataset, threads: int) -> tuple[nn.Module, list[float]]:
    """Trains deterministically; returns the model (eval mode) and the loss per epoch."""
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    model = _ARCHITECTURES[spec.architecture](widths=spec.widths, classes=len(data.classes))
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    steps = spec.epochs * ((len(x) + spec.batch - 1) // spec.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
    losses = []
    for epoch in range(spec.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, start = 0.0, time.perf_counter()
        for i in range(0, len(x), spec.batch):
            idx = order[i : i + spec.batch]
            xb = x[idx]
            if spec.hflip:  # clothes are left-right symmetric; a cheap, label-safe augmentation
                flip = torch.rand(len(idx), generator=generator) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        print(
            f"  {spec.name}: epoch {epoch + 1}/{spec.epochs} loss {losses[-1]:.4f} "
            f"({time.perf_counter() - start:.0f} s, {threads} threads)",
            flush=True,
        )
    return model.eval(), losses


def _export(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> onnx.ModelProto:
    """The ONNX model in inference mode, BatchNormalization kept, dynamic batch."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (dynamo=False): it keeps
        # BatchNormalization as its own node; its deprecation notice is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            example,
            buffer,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def ort_accuracy(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray,
    *,
    threads: int = MAX_THREADS,
    batch: int = 500,
) -> float:
    """Top-1 accuracy of an ONNX model in onnxruntime (CPU), in batches."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = sess.run(None, {name: x[i : i + batch]})[0]
        correct += int(np.sum(np.argmax(logits, axis=1) == y[i : i + batch]))
    return correct / len(x)


def ensure_model(
    name: str, *, cache: Path | None = None, force: bool = False, threads: int = MAX_THREADS
) -> CachedModel:
    """The cached model `name`, trained and exported first if it is not cached yet.

    Raises:
        KeyError: no such model.
        benchmarks.data.DatasetMissingError: its dataset is not installed.
    """
    spec = SPECS[name]
    folder = cache_dir(cache) / f"{name}-{_cache_key(spec)}"
    meta_path = folder / "meta.json"
    if meta_path.is_file() and not force:
        cached = CachedModel(name, folder, json.loads(meta_path.read_text()))
        if cached.onnx_path.is_file() and cached.data_path.is_file():
            print(f"{name}: cached in {folder}", flush=True)
            return cached
    threads = max(1, min(threads, MAX_THREADS))
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    print(f"{name}: loading {spec.dataset}", flush=True)
    data = _LOADERS[spec.dataset]()
    print(
        f"{name}: training {spec.architecture} on {len(data.train_y)} samples, "
        f"{spec.epochs} epochs",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    model, losses = _train(spec, data, threads)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    with torch.no_grad():
        logits = torch.cat(
            [
                model(torch.from_numpy(data.test_x[i : i + 1000]))
                for i in range(0, len(data.test_x), 1000)
            ]
        )
    torch_acc = float((logits.argmax(1).numpy() == data.test_y).mean())
    metadata = {
        "producer": "tailor benchmarks/models.py",
        "model": name,
        "architecture": spec.architecture,
        "dataset": data.description,
        "labels": ", ".join(data.classes),
        "training": (
            f"{spec.epochs} epochs, batch {spec.batch}, AdamW lr {spec.lr} wd {spec.weight_decay}, "
            f"one-cycle, seed {spec.seed}" + (", random horizontal flips" if spec.hflip else "")
        ),
        "torch_version": torch.__version__,
    }
    proto = _export(model, torch.from_numpy(data.test_x[:1]), metadata)
    onnx_acc = ort_accuracy(proto, data.test_x, data.test_y, threads=threads)
    if abs(onnx_acc - torch_acc) > 2.0 / len(data.test_y):
        raise RuntimeError(
            f"{name}: the exported model scores {onnx_acc:.4f} in onnxruntime but {torch_acc:.4f} in torch"
        )
    proto.metadata_props.add(key="test_accuracy", value=f"{onnx_acc:.4f}")
    calib = _calib_indices(spec, len(data.train_x))
    model_bytes = proto.SerializeToString()
    _write_atomic(folder / "model.onnx", lambda f: f.write(model_bytes))
    _write_atomic(
        folder / "data.npz",
        lambda f: np.savez(f, calib_x=data.train_x[calib], test_x=data.test_x, test_y=data.test_y),
    )
    meta = {
        "name": name,
        "spec": asdict(spec),
        "cache_key": folder.name.rsplit("-", 1)[1],
        "dataset": data.description,
        "classes": list(data.classes),
        "input_shape": [None, *data.test_x.shape[1:]],
        "train_samples": int(len(data.train_y)),
        "test_samples": int(len(data.test_y)),
        "calib_samples": CALIB_SIZE,
        "params": int(sum(p.numel() for p in model.parameters())),
        "onnx_bytes": len(model_bytes),
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "test_accuracy": onnx_acc,
        "torch_test_accuracy": torch_acc,
        "epoch_losses": losses,
        "train_seconds": round(seconds, 1),
        # CPU time of all threads: wall time alone overstates the cost on a shared machine.
        "train_cpu_seconds": round(cpu_seconds, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "threads": threads,
        "machine": machine_info(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(meta_path, meta)
    print(
        f"{name}: test accuracy {onnx_acc:.4f} (torch {torch_acc:.4f}), trained in {seconds:.0f} s; "
        f"wrote {folder}",
        flush=True,
    )
    return CachedModel(name, folder, meta)


def main(argv: list[str] | None = None) -> None:
    """Trains (or finds cached) models and writes benchmarks/results/models.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(SPECS), help="comma-separated: " + ",".join(SPECS)
    )
    parser.add_argument(
        "--cache-dir", default=None, help="default $TAILOR_BENCH_CACHE or ~/.cache/tailor-bench"
    )
    parser.add_argument("--force", action="store_true", help="train again even if cached")
    parser.add_argument(
        "--threads", type=int, default=MAX_THREADS, help=f"torch threads (at most {MAX_THREADS})"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "models.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    results = {}
    if args.results.is_file():  # keep entries of models not rebuilt in this run
        results = json.loads(args.results.read_text()).get("models", {})
    for name in names:
        try:
            cached = ensure_model(
                name, cache=args.cache_dir, force=args.force, threads=args.threads
            )
        except datasets.DatasetMissingError as e:
            raise SystemExit(f"{name}: {e}") from e
        results[name] = {k: v for k, v in cached.meta.items() if k != "machine"} | {
            "machine": cached.meta["machine"],
            "cache_folder": cached.folder.name,
        }
    write_json_atomic(args.results, {"models": results})
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
