"""Named device targets: replaces ad-hoc TVM target strings with frozen, validated
:class:`Target` records (TVM target, cross compiler, roofline and power figures, and
where each figure comes from), a registry of the shipped ones and YAML user targets.

A target knows a device; it never decides what to compress or measures anything itself.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from tailor.errors import TargetError

__all__ = [
    "Target",
    "DTYPES",
    "TVM_KINDS",
    "available_targets",
    "get_target",
    "register_target",
    "load_targets",
    "parse_targets",
]

logger = logging.getLogger(__name__)

#: Data types a target may give a peak figure for.
DTYPES = ("float32", "float16", "int8")

#: TVM target kinds tailor knows, and whether they run on a CPU or a GPU.
TVM_KINDS: dict[str, Literal["cpu", "gpu"]] = {
    "llvm": "cpu",
    "c": "cpu",
    "cuda": "gpu",
    "opencl": "gpu",
    "vulkan": "gpu",
    "metal": "gpu",
    "rocm": "gpu",
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# Machine names of `platform.machine()` for each LLVM triple architecture.
_ARCH_ALIASES = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}


def _freeze(value: Any) -> Any:
    """Read-only view of nested dicts/lists, so a frozen Target is frozen all the way down."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Plain dicts and lists again (for JSON, YAML and TVM)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Target:
    """A device tailor can compile for, measure on or predict for.

    Attributes:
        name: short name (`rpi4`, `jetson-nano`, ...), lower case.
        description: one line: the board, its CPU/GPU.
        tvm_target: TVM target in JSON dict form; GPU kinds carry their CPU as `host`.
        cores: CPU cores the runtime uses (the host's cores for GPU kinds).
        peak_gflops: peak compute in GFLOP/s (GOP/s for int8) per dtype in :data:`DTYPES`.
        mem_bandwidth_gbs: peak DRAM bandwidth in GB/s.
        memory_mb: DRAM in MiB.
        storage_mb: storage for the model file in MiB.
        power_idle_w: board power when idle, in watts.
        power_active_w: board power when the compute units are busy, in watts.
        cross_compiler: the C++ compiler that links modules for the device when it is not
            this machine's architecture (`aarch64-linux-gnu-g++`), None for native.
        sources: for each figure, where it comes from (datasheet, or "estimate: ..." with
            the reasoning), so a report can say how far to trust it.
    """

    name: str
    description: str
    tvm_target: Mapping[str, Any] = field(hash=False)
    cores: int
    peak_gflops: Mapping[str, float] = field(hash=False)
    mem_bandwidth_gbs: float
    memory_mb: int
    storage_mb: int
    power_idle_w: float
    power_active_w: float
    cross_compiler: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _validate(self)
        for name in ("tvm_target", "peak_gflops", "sources"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))

    # ------------------------------------------------------------------ derived facts
    @property
    def kind(self) -> str:
        """The TVM target kind (`llvm`, `cuda`, `opencl`, ...)."""
        return str(self.tvm_target["kind"])

    @property
    def device_type(self) -> Literal["cpu", "gpu"]:
        """Whether the target's kernels run on a CPU or a GPU."""
        return TVM_KINDS[self.kind]

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "gpu"

    @property
    def host(self) -> Mapping[str, Any]:
        """The TVM target of the CPU that runs the host code (the target itself for CPUs)."""
        return self.tvm_target.get("host", self.tvm_target) if self.is_gpu else self.tvm_target

    @property
    def arch(self) -> str:
        """The host CPU architecture (`aarch64`, `x86_64`), from its triple or this machine."""
        triple = self.host.get("mtriple")
        if not triple:
            return _ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())
        head = str(triple).split("-")[0].lower()
        return _ARCH_ALIASES.get(head, head)

    @property
    def is_native(self) -> bool:
        """True when modules for this target can be linked and run on this machine's CPU."""
        machine = platform.machine().lower()
        return self.arch == _ARCH_ALIASES.get(machine, machine)

    def peak(self, dtype: str = "float32") -> float:
        """Peak GFLOP/s for `dtype`, falling back to float32 when the dtype has no figure."""
        return float(self.peak_gflops.get(dtype, self.peak_gflops["float32"]))

    def tvm(self):
        """The TVM target (imports TVM).

        Raises:
            TargetError: TVM rejects the target dict.
        """
        import tvm

        try:
            return tvm.target.Target(_thaw(self.tvm_target))
        except (ValueError, TypeError, RuntimeError) as e:
            # TVM appends every option it knows; the first sentence names the problem.
            reason = str(e).splitlines()[0].split(". Known options")[0]
            raise TargetError(f"target {self.name!r}: TVM rejects its tvm_target: {reason}") from e

    def fingerprint(self) -> str:
        """A short hash of the TVM target: caches keyed by it never mix two definitions."""
        text = json.dumps(_thaw(self.tvm_target), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML), the same fields :meth:`from_dict` reads."""
        return {f.name: _thaw(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, origin: str = "<dict>", base: Target | None = None
    ) -> Target:
        """A target from plain data, checking every field.

        Args:
            data: the fields; unknown ones are refused (with a "did you mean").
            origin: where the data came from, for messages (a file name).
            base: a target whose fields fill in what `data` leaves out (`extends:`).

        Raises:
            TargetError: a missing, unknown or invalid field.
        """
        if not isinstance(data, Mapping):
            raise TargetError(f"{origin}: a target must be a mapping of fields, not {_kind(data)}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                name = data.get("name", "?")
                raise TargetError(
                    f"{origin}: target {name!r} has an unknown field {key!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else f"; fields: {', '.join(known)}")
                )
        values: dict[str, Any] = {}
        if base is not None:
            values = base.to_dict()
            own = data.get("sources") or {}
            if not isinstance(own, Mapping):
                raise TargetError(f"{origin}: sources must map field names to strings")
            # An overridden figure is the user's own: the base's source would mislabel it.
            values["sources"] = {k: v for k, v in values["sources"].items() if k not in data}
            values["sources"].update(own)
            values.update({k: v for k, v in data.items() if k != "sources"})
        else:
            values.update(data)
        missing = [f.name for f in fields(cls) if f.name not in values and f.name in _REQUIRED]
        if missing:
            raise TargetError(
                f"{origin}: target {values.get('name', '?')!r} lacks {', '.join(missing)}"
            )
        try:
            return cls(**values)
        except TargetError as e:
            raise TargetError(f"{origin}: {e}") from None


_REQUIRED = {
    "name",
    "description",
    "tvm_target",
    "cores",
    "peak_gflops",
    "mem_bandwidth_gbs",
    "memory_mb",
    "storage_mb",
    "power_idle_w",
    "power_active_w",
}


def _kind(value: Any) -> str:
    return type(value).__name__


def _positive(t: Target, name: str, value: Any, *, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise TargetError(f"target {t.name!r}: {name} must be {what}, not {value!r}")


def _validate(t: Target) -> None:
    """Checks the fields of a new Target (pure Python; TVM itself checks in `tvm()`)."""
    if not isinstance(t.name, str) or not _NAME.match(t.name):
        raise TargetError(
            f"target name {t.name!r} must be lower case letters, digits, '.', '_' or '-'"
        )
    if not isinstance(t.description, str):
        raise TargetError(f"target {t.name!r}: description must be a string")
    tt = t.tvm_target
    if not isinstance(tt, Mapping) or "kind" not in tt:
        raise TargetError(
            f"target {t.name!r}: tvm_target must be a dict with a 'kind', "
            'e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}'
        )
    kind = tt["kind"]
    if kind not in TVM_KINDS:
        hint = difflib.get_close_matches(str(kind), list(TVM_KINDS), n=1)
        raise TargetError(
            f"target {t.name!r}: unknown TVM target kind {kind!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else f"; kinds: {', '.join(TVM_KINDS)}")
        )
    if TVM_KINDS[kind] == "gpu":
        host = tt.get("host")
        if not isinstance(host, Mapping) or TVM_KINDS.get(host.get("kind", "")) != "cpu":
            raise TargetError(
                f"target {t.name!r}: a {kind} target needs a CPU 'host' in tvm_target, "
                'e.g. "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}'
            )
    elif "host" in tt:
        raise TargetError(f"target {t.name!r}: a CPU target ({kind}) takes no 'host'")
    _positive(t, "cores", t.cores, integer=True)
    if not isinstance(t.peak_gflops, Mapping) or "float32" not in t.peak_gflops:
        raise TargetError(
            f"target {t.name!r}: peak_gflops must map dtypes to GFLOP/s and include float32"
        )
    for dtype, value in t.peak_gflops.items():
        if dtype not in DTYPES:
            raise TargetError(
                f"target {t.name!r}: peak_gflops has unknown dtype {dtype!r}; dtypes: "
                + ", ".join(DTYPES)
            )
        _positive(t, f"peak_gflops[{dtype}]", value)
    _positive(t, "mem_bandwidth_gbs", t.mem_bandwidth_gbs)
    _positive(t, "memory_mb", t.memory_mb, integer=True)
    _positive(t, "storage_mb", t.storage_mb, integer=True)
    _positive(t, "power_idle_w", t.power_idle_w)
    _positive(t, "power_active_w", t.power_active_w)
    if t.power_active_w < t.power_idle_w:
        raise TargetError(
            f"target {t.name!r}: power_active_w ({t.power_active_w}) is below power_idle_w "
            f"({t.power_idle_w})"
        )
    if t.cross_compiler is not None and (
        not isinstance(t.cross_compiler, str) or not t.cross_compiler.strip()
    ):
        raise TargetError(f"target {t.name!r}: cross_compiler must be a command name or null")
    if not isinstance(t.sources, Mapping) or not all(
        isinstance(v, str) for v in t.sources.values()
    ):
        raise TargetError(f"target {t.name!r}: sources must map field names to strings")


# ---------------------------------------------------------------------- the registry
_registered: dict[str, Target] = {}
_shipped: dict[str, Target] | None = None
_host: Target | None = None


def _shipped_targets() -> dict[str, Target]:
    """The shipped device targets (without `host`, whose detection imports TVM)."""
    global _shipped
    if _shipped is None:
        from tailor.targets.builtin import BUILTIN_TARGETS

        _shipped = {}
        for data in BUILTIN_TARGETS:
            t = Target.from_dict(data, origin="tailor.targets.builtin")
            _shipped[t.name] = t
    return _shipped


def _host_target() -> Target:
    global _host
    if _host is None:
        from tailor.targets.builtin import detect_host

        _host = Target.from_dict(detect_host(), origin="host detection")
    return _host


def _names() -> list[str]:
    return ["host", *_shipped_targets(), *(n for n in _registered if n != "host")]


def _find(name: str) -> Target | None:
    """The target called `name`, detecting `host` only when it is the one asked for."""
    if name in _registered:
        return _registered[name]
    if name == "host":
        return _host_target()
    return _shipped_targets().get(name)


def available_targets() -> dict[str, Target]:
    """Every known target by name: the shipped ones (`host` detected) and registered ones."""
    found = {name: _find(name) for name in _names()}
    return {name: t for name, t in found.items() if t is not None}


def register_target(target: Target, *, replace: bool = False) -> Target:
    """Makes `target` available by name (:func:`get_target`, `--target NAME`).

    Raises:
        TargetError: the name is taken and `replace` is False.
    """
    if not replace and target.name in _names():
        existing = _find(target.name)
        if existing != target:
            raise TargetError(
                f"a target named {target.name!r} already exists; choose another name "
                f"(or extend it: `extends: {target.name}`)"
            )
    _registered[target.name] = target
    return target


def get_target(spec: str | os.PathLike | Target) -> Target:
    """Resolves a target: a :class:`Target`, a name, a YAML file with one target, or
    `FILE.yaml:NAME`.

    Raises:
        TargetError: unknown name (with the closest names), unreadable or invalid file.
    """
    if isinstance(spec, Target):
        return spec
    text = os.fspath(spec)
    path_text, _, name = text.rpartition(":") if ":" in text else (text, "", "")
    for candidate, wanted in ((text, None), (path_text, name)):
        if candidate and Path(candidate).suffix in (".yaml", ".yml") and Path(candidate).exists():
            loaded = load_targets(candidate)
            if wanted:
                for t in loaded:
                    if t.name == wanted:
                        return t
                raise TargetError(
                    f"{candidate} defines no target {wanted!r}; it defines "
                    + ", ".join(t.name for t in loaded)
                )
            if len(loaded) != 1:
                raise TargetError(
                    f"{candidate} defines {len(loaded)} targets; pick one as "
                    f"{candidate}:NAME ({', '.join(t.name for t in loaded)})"
                )
            return loaded[0]
    for candidate in (text, path_text):
        if Path(candidate).suffix in (".yaml", ".yml"):
            raise TargetError(f"target file {candidate} does not exist")
    known = _names()
    if text in known:
        found = _find(text)
        assert found is not None
        return found
    hint = difflib.get_close_matches(text, known, n=1, cutoff=0.5)
    raise TargetError(
        f"unknown target {text!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; known targets: {', '.join(known)} (or a YAML file)"
    )


def parse_targets(data: Any, *, origin: str = "<yaml>") -> list[Target]:
    """Targets from parsed YAML: one target, a list, or `{targets: [...]}`.

    A target may say `extends: NAME` to start from a known target (shipped, registered, or
    defined earlier in the same file) and override some fields.
    """
    if isinstance(data, Mapping) and "targets" in data and "name" not in data:
        extra = set(data) - {"targets"}
        if extra:
            raise TargetError(
                f"{origin}: unknown top-level key(s) {', '.join(map(str, sorted(extra)))}"
            )
        data = data["targets"]
    items: Iterable[Any] = [data] if isinstance(data, Mapping) else data
    if not isinstance(items, list) or not items:
        raise TargetError(
            f"{origin}: expected a target (a mapping with 'name'), a list of them, or "
            f"'targets:' with a list; got {_kind(data)}"
        )
    out: list[Target] = []
    local: dict[str, Target] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TargetError(f"{origin}: entry {i} is {_kind(item)}, not a mapping of fields")
        item = dict(item)
        base = None
        if "extends" in item:
            parent = str(item.pop("extends"))
            base = local.get(parent) or _lookup(parent, origin)
        target = Target.from_dict(item, origin=origin, base=base)
        if target.name in local:
            raise TargetError(f"{origin}: target {target.name!r} is defined twice")
        local[target.name] = target
        out.append(target)
    return out


def _lookup(name: str, origin: str) -> Target:
    try:
        return get_target(name)
    except TargetError as e:
        raise TargetError(f"{origin}: extends {e}") from None


def load_targets(path: str | os.PathLike, *, register: bool = True) -> list[Target]:
    """Reads user targets from a YAML file and (by default) registers them.

    Raises:
        TargetError: unreadable file, YAML syntax error (with its line), invalid target,
            or a name that clashes with a different known target.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TargetError(f"cannot read target file {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TargetError(f"{path}: invalid YAML{where}: {problem}") from e
    targets = parse_targets(data, origin=str(path))
    for t in targets:
        try:
            t.tvm()  # TVM's own check of the target dict, at load time rather than at build time
        except TargetError as e:
            raise TargetError(f"{path}: {e}") from e.__cause__
        if register:
            register_target(t)
    return targets
