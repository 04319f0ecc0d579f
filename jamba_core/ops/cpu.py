"""The fast CPU path: C++ kernels (``cpu_kernels.cpp``) compiled on first use, called through ctypes.

Why this route (measured on bench-small shapes by benchmarks/ops_choice.py, see benchmarks/README.md): the
C++ scan holds each block of W channels' SSM state in registers (W = 16, 8 or 4 lanes, the vector
register's width: see ``features``) and vectorises across channels, so at 2048 tokens it is about 6x faster
than numba (whose scalar exp, fastmath off, does not vectorise), 19x faster than the reference and far ahead
of torch.compile, with no (b, d_inner, L, d_state) temporaries; it needs only a C++ compiler (g++ or
clang++, found as ``$CXX``, ``c++``, ``g++``), builds in a few seconds with no torch headers, ninja or
pybind11, and is cached per source, compiler and CPU. Where no compiler works, every function here runs
the reference instead (with one warning), so the dispatch never breaks.

Each function has the signature and result of its reference (``reference.py`` and the compositions in
``jamba_core/ops/__init__.py``); layouts are free (the kernels take strides), dtypes fp32 or bf16.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
# tried in order: a compiler that rejects -march=native (some non-x86 ones) or has no OpenMP still builds
FLAG_SETS = [FLAGS, [f for f in FLAGS if f != "-march=native"], [f for f in FLAGS if f not in ("-march=native", "-fopenmp")]]
# $JAMBA_LOCAL_CXXFLAGS: more flags after each set (part of the cache key), e.g. "-mno-avx512bf16" to build
# the paths a CPU without an instruction set takes (tests/test_ops.py does so)
# F.linear with at most this many rows goes through the GEMV kernel (torch's bf16 matmul is slow up to
# about 16 rows; its fp32 one is as fast as the kernel past 4)
MAX_GEMV_ROWS = {torch.float32: 4, torch.bfloat16: 16}
MAX_D_STATE = 64  # cpu_kernels.cpp's MAX_N
SCAN_FUSES_DELTA = True  # selective_scan takes delta_bias / delta_softplus (see jamba_core.ops.selective_scan)
MAX_D_CONV = 8  # the conv kernel keeps K weight vectors and K-1 inputs in fixed arrays of 8

_state: dict = {"lib": None, "error": None, "tried": False}
_lock = threading.Lock()
_DT = {torch.float32: 0, torch.bfloat16: 1}
_p = ctypes.c_void_p
_i = ctypes.c_int64
_c = ctypes.c_int
_f = ctypes.c_float
_SIGNATURES = {
    "jl_scan": [_c, _c, _i, _i, _i, _i, _p, _i, _i, _p, _i, _i, _p, _i, _i, _p, _c, _p, _p, _p, _p, _p, _p, _c],
    "jl_conv": [_c, _i, _i, _i, _i, _p, _i, _i, _p, _p, _p, _p, _c, _c],
    "jl_gemv": [_c, _i, _i, _i, _p, _i, _p, _p, _p, _c],
    "jl_gemv_i8": [_c, _i, _i, _i, _p, _i, _p, _p, _p, _c],
    "jl_ffn_decode": [_c, _c, _i, _i, _i, _i, _i, _p, _i, _p, _p, _p, _p, _p, _p, _p, _p, _c],
    "jl_rmsnorm": [_c, _c, _i, _i, _p, _i, _p, _f, _p, _c],
    "jl_mamba_decode": [_c, _i, _i, _i, _i, _i, _p, _i, _p, _p, _p, _p, _p, _p, _p, _f, _p, _p, _p, _p, _p, _p, _c],
    "jl_mamba_layer_decode": [_c, _c, *[_i] * 9, _p, _p, _p, _f, *[_p] * 10, _f, *[_p] * 16, _c, _c],
    "jl_attn_layer_decode": [_c, _c, _c, *[_i] * 9, _p, _p, _p, _f, *[_p] * 6, _i, _i, *[_p] * 8, _c],
    "jl_flash": [_c, *[_i] * 5, _p, _i, _i, _i, _p, _i, _i, _i, _p, _i, _i, _i, _f, _p, _p, _c],
    "jl_train_scan_fwd": [*[_i] * 4, *[_p] * 6, _c],
    "jl_train_scan_bwd": [*[_i] * 4, *[_p] * 11, _c],
    "jl_features": [],
    "jl_set_bf16_streams": [_c],
}
_RESTYPES = {"jl_flash": ctypes.c_int, "jl_features": ctypes.c_int, "jl_set_bf16_streams": ctypes.c_int}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("JAMBA_LOCAL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jamba-local")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's flags: part of the cache key, since the build is ``-march=native``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(force: bool = False, source: Path = SOURCE) -> Path:
    """Compile ``source`` (default ``cpu_kernels.cpp``) into the cache (once per source, compiler and CPU)
    and return the library's path. Raises ``RuntimeError`` with the compiler's output when it cannot build."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    code = source.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{cxx} --version failed: {err}") from err
    extra = os.environ.get("JAMBA_LOCAL_CXXFLAGS", "").split()
    key = hashlib.sha256(code + " ".join(FLAGS + extra).encode() + version.encode() + _cpu_signature().encode()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "jamba-local-kernels"):
        lib = folder / f"lib{source.stem}_{key}.so"
        if lib.is_file() and not force:
            return lib
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        tmp = folder / f".{lib.name}.{os.getpid()}.tmp"
        errors = []
        for flags in FLAG_SETS:
            proc = subprocess.run([cxx, *flags, *extra, str(source), "-o", str(tmp)], capture_output=True, text=True, timeout=600)
            if proc.returncode == 0:
                os.replace(tmp, lib)  # atomic: concurrent builders never see half a library
                return lib
            errors.append(f"{' '.join(flags)}:\n{proc.stderr[-2000:]}")
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cxx} failed to build {source.name}:\n" + "\n".join(errors))
    raise RuntimeError(f"no writable cache folder for the kernels (tried {_cache_dir()} and the temp folder)")


def _lib():
    """The loaded library, or None when it cannot be built (then the reference runs)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                torch.get_num_threads()  # torch's libgomp is loaded first, so the kernels share its threads
                lib = ctypes.CDLL(str(build()))
                for name, argtypes in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
                if lib.jl_features() & 2:  # AVX512-BF16: the bf16 GEMVs' row streams, as measured here
                    lib.jl_set_bf16_streams(bf16_gemv_streams(lib))
                _state["lib"] = lib
            except Exception as err:  # no compiler, failed build, unloadable library: fall back
                _state["error"] = f"{type(err).__name__}: {err}"
                log.warning("jamba_core fast CPU kernels unavailable, using the reference ops: %s", _state["error"])
            _state["tried"] = True
    return _state["lib"]


# Each thread of a bf16 GEMV on AVX512-BF16 reads its rows one after the other (1 stream) or NS = 4 rows at once
# (rows g, g + N/4, ...): which is faster differs between CPUs (cpu_kernels.cpp, bf16_streams: one on a Zen 4
# EPYC, by 11% of bench-small's bf16 decode; four on an Intel Xeon with AMX, by 23%). $JAMBA_LOCAL_BF16_STREAMS:
# "auto" (measured once, when the kernels load), "1", "4".
def bf16_gemv_streams(lib) -> int:
    """The row streams per thread the bf16 GEMVs of ``lib`` (the loaded kernels) should read: see above."""
    mode = os.environ.get("JAMBA_LOCAL_BF16_STREAMS", "auto")
    if mode in ("1", "4"):
        return int(mode)
    return _measure_bf16_streams(lib)


def _measure_bf16_streams(lib, reps: int = 6) -> int:
    """Time 1 x 512 GEMVs over 8 bf16 matrices of 4,096 x 512 (32 MiB, bench-small's largest layer matrices'
    size) with one stream and with four, interleaved (about 20 ms); four win when faster by 5%: noise near
    parity keeps one. Leaves the library at one stream. On the Xeon above, 2 threads, the fastest pass 0.68-0.77 ms
    with one and 0.60 with four in four processes (these matrices stay in its L3; 168 MiB of them streamed at
    21 and 26-27 GB/s, and whole decode steps gained 23%)."""
    mats = [torch.full((4096, 512), 0.5 + i, dtype=torch.bfloat16) for i in range(8)]
    x, y = torch.full((1, 512), 0.25, dtype=torch.bfloat16), torch.empty(1, 4096, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    times = {1: [], 4: []}
    for i in range(reps + 1):
        for streams in ((1, 4) if i % 2 else (4, 1)):
            lib.jl_set_bf16_streams(streams)
            t = time.perf_counter()
            for w in mats:
                lib.jl_gemv(1, 1, 4096, 512, x.data_ptr(), 512, w.data_ptr(), None, y.data_ptr(), threads)
            if i:  # the first round warms both up
                times[streams].append(time.perf_counter() - t)
    lib.jl_set_bf16_streams(1)
    return 4 if min(times[4]) < 0.95 * min(times[1]) else 1


def set_bf16_gemv_streams(streams: int) -> int:
    """Set the loaded kernels' bf16 GEMV row streams per thread (1 or 4; other values keep the setting) and
    return the setting; 0 without the kernels."""
    lib = _lib()
    return 0 if lib is None else lib.jl_set_bf16_streams(streams)


def features() -> dict | None:
    """What the loaded kernels were built with: ``lanes`` (fp32 lanes per vector: 16 with AVX-512, 8 with
    AVX / AVX2, 4 otherwise: SSE2, aarch64's NEON), ``avx512`` (the fp32 flash-attention kernel),
    ``avx512_bf16`` (bf16 GEMVs and the bf16 flash kernel on VDPBF16PS), ``avx512_vnni`` (int8 GEMVs on
    VPDPWSSD); None without the kernels."""
    lib = _lib()
    if lib is None:
        return None
    f = lib.jl_features()
    return {"lanes": f >> 8, "avx512": bool(f & 1), "avx512_bf16": bool(f & 2), "avx512_vnni": bool(f & 4)}


def available() -> bool:
    """True when the kernels are built and loaded (building them now if needed)."""
    return _lib() is not None


def status() -> str:
    """``"loaded"``, or why the reference ops run instead."""
    return "loaded" if available() else f"unavailable ({_state['error']})"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A ``(b, d, L)`` tensor whose channels are contiguous (stride 1 along d), as the kernels read it."""
    if t.stride(1) == 1 and t.shape[1] > 0:
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


# Below SERIAL_WORK multiply-adds (or elements) a kernel runs on one thread: a parallel region's start and
# barrier cost more than they save. Below BUSY_SERIAL_WORK too while other processes use the cores our
# threads need (as MKL_DYNAMIC does for MKL): each parallel region then waits for a thread the OS has
# preempted. Measured on bench-small decode beside other processes: with every GEMV above 128K elements
# parallel (about 50 regions per token) the median step was 6x slower than with only the LM head parallel;
# on a quiet machine the parallel GEMVs read weights faster (the fastest steps, 16 ms against 40 ms).
SERIAL_WORK = 1 << 17
BUSY_SERIAL_WORK = 1 << 22
BUSY_CHECK_S = 0.25  # how often the CPU time of other processes is sampled
_busy = {"checked": -1e9, "busy": False, "sample": None}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cgroup cpusets)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the cores this process may use, CPU s of this process) from /proc/stat's per-core
    lines and os.times(); None off Linux.

    Busy counts user, nice, system, irq, softirq and steal (time a hypervisor gave to other machines)."""
    try:
        with open("/proc/stat", "rb") as f:
            lines = [line.split() for line in f if line.startswith(b"cpu")]
        ticks = os.sysconf("SC_CLK_TCK")
        allowed = {f"cpu{i}".encode() for i in os.sched_getaffinity(0)}
    except (OSError, ValueError, AttributeError):
        return None
    # the cores this process may run on (taskset, cgroup cpusets): load elsewhere takes nothing from its threads
    mine = [fields for fields in lines if fields[0] in allowed and len(fields) >= 9]
    if not mine:
        return None
    busy = sum(int(v) for fields in mine for v in (fields[1:4] + fields[6:9]))  # user nice system, irq softirq steal
    t = os.times()
    return time.monotonic(), busy / ticks, t.user + t.system


def _machine_busy() -> bool:
    """Whether other processes (or other virtual machines, as steal time) use the cores this process's
    threads need: over the last BUSY_CHECK_S or more, the CPU time spent outside this process averaged
    more than ``cores - threads + 0.5`` cores (from /proc/stat, sampled at most every BUSY_CHECK_S).
    Where /proc/stat cannot be read: the 1-minute load average above the cores + 0.5. A hog started a
    second ago counts at the next sample; the load average takes about a minute to show it."""
    now = time.monotonic()
    if now - _busy["checked"] < BUSY_CHECK_S:
        return _busy["busy"]
    _busy["checked"] = now
    sample, last = _cpu_sample(), _busy["sample"]
    if sample is None or last is None:
        _busy["sample"] = sample
        try:
            _busy["busy"] = os.getloadavg()[0] > _cores() + 0.5
        except OSError:
            _busy["busy"] = False
        return _busy["busy"]
    wall = sample[0] - last[0]
    others = ((sample[1] - last[1]) - (sample[2] - last[2])) / wall
    _busy["sample"] = sample
    _busy["busy"] = others > _cores() - max(1, torch.get_num_threads()) + 0.5
    return _busy["busy"]


def _threads(work: int | None = None) -> int:
    """torch's thread count, or one thread for small work (see SERIAL_WORK)."""
    if work is not None and (work < SERIAL_WORK or (work < BUSY_SERIAL_WORK and _machine_busy())):
        return 1
    return max(1, torch.get_num_threads())


def _supported(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _DT for t in tensors)


# -- selective scan ---------------------------------------------------------------------------------
def selective_scan(x, delta, A, B, C, D, z, state, delta_bias=None, delta_softplus=False):
    """As `reference.selective_scan`; returns y ``(b, d_in, L)`` fp32 (a view of a ``(b, L, d_in)``
    buffer, so ``y.transpose(1, 2)`` is contiguous). With ``delta_bias`` / ``delta_softplus`` (as
    mamba_ssm's ``selective_scan_fn``), ``delta`` is the raw dt_proj output (any float dtype) and the
    kernel applies ``softplus(delta + delta_bias)`` itself."""
    lib = _lib()
    b, d, L = x.shape
    N = A.shape[-1]
    if (lib is None or L == 0 or N > MAX_D_STATE or x.dtype != z.dtype or not _supported(x, z, delta)
            or state.dtype != torch.float32 or not state.is_contiguous()):
        if delta_bias is not None:
            delta = delta.float() + delta_bias.float()[None, :, None]
        if delta_softplus:
            delta = F.softplus(delta.float())
        return reference.selective_scan(x, delta.float(), A, B, C, D, z, state)
    x, z, delta = _channels_last(x), _channels_last(z), _channels_last(delta)
    At = A.float().t().contiguous()  # (N, d)
    Bf, Cf = B.float().contiguous(), C.float().contiguous()  # (b, L, N)
    Df = D.float().contiguous()
    bias = None if delta_bias is None else delta_bias.float().contiguous()
    y = torch.empty(b, L, d, dtype=torch.float32)
    lib.jl_scan(_DT[x.dtype], _DT[delta.dtype], b, L, d, N, _ptr(x), x.stride(0), x.stride(2), _ptr(z), z.stride(0),
                z.stride(2), _ptr(delta), delta.stride(0), delta.stride(2), _ptr(bias), int(bool(delta_softplus)), _ptr(At),
                _ptr(Bf), _ptr(Cf), _ptr(Df), _ptr(state), _ptr(y), _threads(b * L * d * N * 8))
    return y.transpose(1, 2)


def selective_state_update(x, delta, A, B, C, D, z, state):
    """As `reference.selective_state_update` (one token: the scan with L = 1)."""
    return selective_scan(x[:, :, None], delta[:, :, None], A, B[:, None], C[:, None], D, z[:, :, None], state)[:, :, 0]


# -- causal conv ------------------------------------------------------------------------------------
def _conv(x, weight, bias, conv_state, silu: bool):
    lib = _lib()
    b, d, L = x.shape
    K = weight.shape[-1]
    if (lib is None or L == 0 or K > MAX_D_CONV or not _supported(x) or conv_state.dtype != x.dtype
            or not conv_state.is_contiguous()):
        out = reference.causal_conv1d(x, weight, bias, conv_state)
        return F.silu(out) if silu else out
    x = _channels_last(x)
    wT = weight.float().t().contiguous()  # (K, d)
    bf = None if bias is None else bias.float().contiguous()
    out = torch.empty(b, L, d, dtype=x.dtype)
    lib.jl_conv(_DT[x.dtype], b, L, d, K, _ptr(x), x.stride(0), x.stride(2), _ptr(conv_state), _ptr(wT), _ptr(bf),
                _ptr(out), int(silu), _threads(b * L * d * K))
    return out.transpose(1, 2)


def causal_conv1d(x, weight, bias, conv_state):
    """As `reference.causal_conv1d`; returns ``(b, d_in, L)`` in x's dtype (a view of ``(b, L, d_in)``)."""
    return _conv(x, weight, bias, conv_state, silu=False)


def causal_conv1d_silu(x, weight, bias, conv_state):
    """``silu(causal_conv1d(...))`` in one pass (bf16: the conv result is rounded first, as torch does)."""
    return _conv(x, weight, bias, conv_state, silu=True)


# -- linear, RMSNorm --------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; a few rows (decode) through the GEMV kernel, which reads the weights once at memory
    bandwidth (torch's bf16 path for a few rows is far slower), everything else through torch."""
    lib = _lib()
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    grad = x.requires_grad or weight.requires_grad and torch.is_grad_enabled()
    if (rows > MAX_GEMV_ROWS.get(x.dtype, 0) and x.dtype == weight.dtype == torch.bfloat16 and not grad
            and x.device.type == "cpu" and weight.device.type == "cpu" and bf16_matmul_upcast()):
        return _linear_upcast(x, weight, bias)
    if (lib is None or rows == 0 or rows > MAX_GEMV_ROWS.get(x.dtype, 0) or x.dtype != weight.dtype or not _supported(x, weight)
            or not weight.is_contiguous() or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())) or grad):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    N = weight.shape[0]
    y = torch.empty(rows, N, dtype=x.dtype)
    lib.jl_gemv(_DT[x.dtype], rows, N, K, _ptr(x2), x2.stride(0), _ptr(weight), _ptr(bias), _ptr(y), _threads(rows * N * K))
    return y.view(*x.shape[:-1], N)


# torch's bf16 GEMM is the faster one on some CPUs and not on others (measured by benchmarks/bench.py on
# bench-small's shapes, 2 threads: AMD EPYC bf16 438 / fp32 196 GFLOP/s; an Intel Xeon with AVX512-BF16
# and no AMX bf16 168 / fp32 327). Where it is slower, a bf16 linear of many rows runs as fp32 on
# upcast copies (exact: every bf16 is an fp32) and rounds its output to bf16 as torch's does; the sums
# are fp32 in both. $JAMBA_LOCAL_BF16_MATMUL: "auto" (measured once per thread count), "upcast", "native".
UPCAST_BLOCK_ELEMENTS = 1 << 22  # weight elements upcast at a time (16 MiB of fp32): the copies stay small
_bf16_choice: dict[int, bool] = {}


def _measured_choice(env: str, forced: dict[str, bool], cache: dict[int, bool], measure) -> bool:
    """``forced[$env]`` when the variable names one of its settings, else ``measure()``, measured once per torch
    thread count (kept in ``cache``)."""
    mode = os.environ.get(env, "auto")
    if mode in forced:
        return forced[mode]
    threads = torch.get_num_threads()
    if threads not in cache:
        cache[threads] = measure()
    return cache[threads]


def bf16_matmul_upcast() -> bool:
    """Whether bf16 linears of many rows run as fp32 on upcast copies (see above)."""
    return _measured_choice("JAMBA_LOCAL_BF16_MATMUL", {"upcast": True, "native": False}, _bf16_choice, _measure_bf16_upcast)


def _measure_bf16_upcast(reps: int = 3) -> bool:
    """Time a (256 x 512) @ (512 x 1024) bf16 linear natively and upcast, interleaved (about 20 ms in
    all); upcast wins only when clearly faster (20%), so noise near parity keeps torch's path."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 512, generator=g).bfloat16(), torch.randn(1024, 512, generator=g).bfloat16()
    native, upcast = [], []
    with torch.no_grad():
        for i in range(reps + 1):
            t = time.perf_counter()
            F.linear(x, w)
            t1 = time.perf_counter()
            F.linear(x.float(), w.float()).bfloat16()
            t2 = time.perf_counter()
            if i:  # the first round warms both up
                native.append(t1 - t)
                upcast.append(t2 - t1)
    return min(upcast) < 0.8 * min(native)


def _linear_upcast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of bf16 tensors computed in fp32 on upcast copies, output rounded to bf16: x ``(..., K)``,
    weight ``(N, K)``, bias ``(N,)`` or None -> ``(..., N)`` bf16. The weight is upcast
    `UPCAST_BLOCK_ELEMENTS` at a time (blocks of output features), so the copies stay small."""
    N, K = weight.shape
    xf = x.reshape(-1, K).float()
    y = torch.empty(xf.shape[0], N, dtype=torch.bfloat16)
    step = max(1, UPCAST_BLOCK_ELEMENTS // max(K, 1))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        y[:, n0:n1] = F.linear(xf, weight[n0:n1].float(), None if bias is None else bias[n0:n1].float())
    return y.view(*x.shape[:-1], N)


# int8_matmul with at most this many rows goes through the int8 GEMV kernel (decode, and the few tokens an
# expert gets); from here on `jamba_core.quant.int8`'s tiled dequantize + GEMM is faster
MAX_INT8_GEMV_ROWS = 31


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``(x @ weight.T) * scale`` (x ``(M, K)`` fp32 / bf16, weight ``(N, K)`` int8, scale ``(N,)`` fp32 ->
    ``(M, N)`` in x's dtype, fp32 accumulation) for up to `MAX_INT8_GEMV_ROWS` rows; None otherwise (the
    caller runs its own path). Reads the int8 matrix once."""
    lib = _lib()
    M, K = x.shape
    if (lib is None or M == 0 or M > MAX_INT8_GEMV_ROWS or not _supported(x) or weight.dtype != torch.int8
            or scale.dtype != torch.float32 or not weight.is_contiguous() or not scale.is_contiguous()
            or weight.device.type != "cpu" or x.requires_grad):
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    lib.jl_gemv_i8(_DT[x.dtype], M, N, K, _ptr(x), x.stride(0), _ptr(weight), _ptr(scale), _ptr(y), _threads(M * N * K))
    return y


# ffn_decode takes at most this many tokens (decode batches); more run the module's own ops
MAX_FFN_DECODE_ROWS = 8
_WT = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _ffn_operands(dtype: torch.dtype, H: int, router_weight: torch.Tensor | None, experts, top_k: int):
    """``(weight type code, intermediate size, the six per-expert pointer arrays: gate, gate scales, up,
    up scales, down, down scales)`` for the fused feed-forward kernels, or None when the weights do not
    fit them (see `jamba_core.ops.ffn_decode` for their forms)."""
    mats = [m for e in experts for m in e]  # (weight, scale) of gate, up, down per expert
    wt = mats[0][0].dtype if mats else None
    if (wt not in _WT or (wt != torch.int8 and wt != dtype)
            or (router_weight is not None and (router_weight.dtype != dtype or not router_weight.is_contiguous()))
            or any(w.dtype != wt or not w.is_contiguous() or w.device.type != "cpu"
                   or (wt == torch.int8) != (sc is not None and sc.dtype == torch.float32 and sc.is_contiguous()) for w, sc in mats)):
        return None
    E = len(experts)
    I = experts[0][0][0].shape[0]
    if (any(g.shape != (I, H) or u.shape != (I, H) or d.shape != (H, I) for (g, _), (u, _), (d, _) in experts)
            or (router_weight is not None and router_weight.shape != (E, H)) or not 1 <= top_k <= E):
        return None
    int8 = wt == torch.int8

    def pointers(j: int, scales: bool):
        return (ctypes.c_void_p * E)(*[e[j][1 if scales else 0].data_ptr() for e in experts]) if int8 or not scales else None

    return _WT[wt], I, tuple(pointers(j, scales) for j in range(3) for scales in (False, True))


def ffn_decode(x: torch.Tensor, router_weight: torch.Tensor | None, experts, top_k: int) -> torch.Tensor | None:
    """The feed-forward of a few tokens in one kernel call (see `jamba_core.ops.ffn_decode`); None when
    the inputs do not fit the kernel (the caller then runs its modules)."""
    lib = _lib()
    T, H = x.shape
    if lib is None or T == 0 or T > MAX_FFN_DECODE_ROWS or not _supported(x) or x.stride(1) != 1 or x.requires_grad:
        return None
    operands = _ffn_operands(x.dtype, H, router_weight, experts, top_k)
    if operands is None:
        return None
    wt, I, pointers = operands
    out = torch.empty(T, H, dtype=x.dtype)
    lib.jl_ffn_decode(_DT[x.dtype], wt, T, H, I, len(experts), top_k, _ptr(x), x.stride(0), _ptr(router_weight), *pointers,
                      _ptr(out), _threads(2 * H * I))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`` computed in fp32 (`jamba_core.ops.rms_norm_reference`),
    in the dtype torch's promotion gives (an fp32 residual stream with bf16 weights: fp32)."""
    lib = _lib()
    n = x.shape[-1]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if (lib is None or x.numel() == 0 or not _supported(x, weight) or out_dtype != x.dtype or not weight.is_contiguous()
            or weight.shape != (n,)):
        return _rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=out_dtype)
    lib.jl_rmsnorm(_DT[x.dtype], _DT[weight.dtype], x2.shape[0], n, _ptr(x2), x2.stride(0), _ptr(weight), float(eps),
                   _ptr(out), _threads(x2.numel()))
    return out.view(x.shape)


def _rms_norm_reference(x, weight, eps):
    from . import rms_norm_reference  # the composition lives with the dispatch

    return rms_norm_reference(x, weight, eps)


# -- fused Mamba decode step ------------------------------------------------------------------------
def mamba_decode_step(xz, conv_wT, conv_b, x_proj_weight, dt_norm_weight, b_norm_weight, c_norm_weight, eps,
                      dt_proj_weight, dt_bias, A, D, conv_state, ssm_state):
    """The Mamba mixer between in_proj and out_proj for one token, in one kernel call (see
    `jamba_core.ops.mamba_decode_step`). Returns y ``(b, d_in)`` fp32, or None when the inputs do not fit
    the kernel (the caller then runs the unfused ops)."""
    lib = _lib()
    b = xz.shape[0]
    K, d = conv_wT.shape
    N = A.shape[-1]
    R = dt_proj_weight.shape[1]
    dt = xz.dtype
    mats = (x_proj_weight, dt_norm_weight, b_norm_weight, c_norm_weight, dt_proj_weight)
    fp32 = (conv_wT, dt_bias, A, D) + (() if conv_b is None else (conv_b,))
    if (lib is None or dt not in _DT or xz.device.type != "cpu" or K > MAX_D_CONV or xz.stride(1) != 1
            or conv_state.dtype != dt or not conv_state.is_contiguous()
            or ssm_state.dtype != torch.float32 or not ssm_state.is_contiguous()
            or any(w.dtype != dt or not w.is_contiguous() for w in mats)
            or any(t.dtype != torch.float32 or not t.is_contiguous() for t in fp32)):
        return None
    y = torch.empty(b, d, dtype=torch.float32)
    lib.jl_mamba_decode(_DT[dt], b, d, N, R, K, _ptr(xz), xz.stride(0), _ptr(conv_state), _ptr(conv_wT), _ptr(conv_b),
                        _ptr(x_proj_weight), _ptr(dt_norm_weight), _ptr(b_norm_weight), _ptr(c_norm_weight), float(eps),
                        _ptr(dt_proj_weight), _ptr(dt_bias), _ptr(A), _ptr(D), _ptr(ssm_state), _ptr(y),
                        _threads(b * d * N * 8))  # bench-small, one sequence: 38 us serial, 22 us on 2 threads
    return y


# -- a whole decoder layer ------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """A decoder layer's weights checked once for `mamba_layer_decode` or `attention_layer_decode`: the
    kernel's constant arguments, and the tensors they point into (held, so the pointers stay valid)."""

    args: tuple
    dims: tuple  # (dtype code, H, d_in, d_state) or (dtype code, H, kv_heads, head_dim)
    tensors: tuple
    max_rows: int


def prepare_mamba_layer(w: dict) -> LayerPlan | None:
    """Check a Mamba decoder layer's weights (see `jamba_core.ops.prepare_layer`) for the layer kernel;
    None when they do not fit it (another dtype, int8 or bitsandbytes projections, a bias on an expert)."""
    lib = _lib()
    dt = w["ln1"].dtype
    mats = [w[k] for k in ("ln1", "x_proj", "dt_norm", "b_norm", "c_norm", "dt_proj", "ln2")]
    mats += [t for t in (w["in_bias"], w["out_bias"], w["router"]) if t is not None]
    for name in ("in", "out"):  # float, or int8 with fp32 row scales and no bias (jamba_core.quant.int8)
        weight, scale = w[f"{name}_proj"], w[f"{name}_scale"]
        if scale is None:
            mats.append(weight)
        elif (lib is None or weight.dtype != torch.int8 or not weight.is_contiguous() or weight.device.type != "cpu"
              or scale.dtype != torch.float32 or not scale.is_contiguous() or w[f"{name}_bias"] is not None):
            return None
    fp32 = [w[k] for k in ("conv_wT", "dt_bias", "A", "D")] + ([w["conv_b"]] if w["conv_b"] is not None else [])
    experts = w["experts"]
    if (lib is None or dt not in _DT or None in experts
            or any(t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu" for t in mats)
            or any(t.dtype != torch.float32 or not t.is_contiguous() for t in fp32)
            or w["conv_wT"].shape[0] > MAX_D_CONV):
        return None
    H, d = w["ln1"].shape[0], w["D"].shape[0]
    N, R, K = w["A"].shape[1], w["dt_proj"].shape[1], w["conv_wT"].shape[0]
    operands = _ffn_operands(dt, H, w["router"], experts, w["top_k"])
    if operands is None or w["in_proj"].shape != (2 * d, H) or w["out_proj"].shape != (H, d):
        return None
    wt, I, ffn = operands
    codes, sizes = (_DT[dt], wt), (H, d, N, R, K, I, len(experts), w["top_k"])
    weights = (_ptr(w["ln1"]), float(w["eps"]), _ptr(w["in_proj"]), _ptr(w["in_bias"]), _ptr(w["in_scale"]))
    mixer = (_ptr(w["conv_wT"]), _ptr(w["conv_b"]), _ptr(w["x_proj"]), _ptr(w["dt_norm"]), _ptr(w["b_norm"]),
             _ptr(w["c_norm"]), float(w["eps_dt"]), _ptr(w["dt_proj"]), _ptr(w["dt_bias"]), _ptr(w["A"]), _ptr(w["D"]))
    tail = (_ptr(w["out_proj"]), _ptr(w["out_bias"]), _ptr(w["out_scale"]), _ptr(w["ln2"]), _ptr(w["router"]), *ffn)
    held = (tuple(mats) + tuple(fp32) + tuple(t for e in experts for pair in e for t in pair if t is not None)
            + tuple(t for k in ("in_proj", "in_scale", "out_proj", "out_scale") if (t := w[k]) is not None))
    return LayerPlan((codes, sizes, weights, mixer, tail), (_DT[dt], H, d, N), held,
                          min(MAX_FFN_DECODE_ROWS, MAX_GEMV_ROWS[dt]))


def mamba_layer_decode(plan: LayerPlan, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor | None:
    """The layer for ``x`` ``(b, hidden)`` fp32 (one token per sequence) in one kernel call; returns the new
    residual stream ``(b, hidden)`` fp32, or None when the inputs do not fit (the modules then run)."""
    code, H, d, N = plan.dims
    b = x.shape[0]
    dt = torch.bfloat16 if code == 1 else torch.float32
    if (b == 0 or b > plan.max_rows or x.dtype != torch.float32 or x.shape[1] != H or not x.is_contiguous()
            or conv_state.dtype != dt or not conv_state.is_contiguous() or conv_state.shape[:2] != (b, d)
            or ssm_state.dtype != torch.float32 or not ssm_state.is_contiguous() or ssm_state.shape != (b, d, N)):
        return None
    codes, sizes, weights, mixer, tail = plan.args
    out = torch.empty_like(x)
    _lib().jl_mamba_layer_decode(*codes, b, *sizes, x.data_ptr(), out.data_ptr(), *weights, conv_state.data_ptr(),
                                 *mixer, ssm_state.data_ptr(), *tail, _threads(b * H * d), _threads(b * d * N * 8))
    return out


def prepare_attention_layer(w: dict) -> LayerPlan | None:
    """Check an attention decoder layer's weights (see `jamba_core.ops.prepare_layer`) for the
    layer kernel; None when they do not fit it."""
    lib = _lib()
    dt = w["ln1"].dtype
    mats = [w[k] for k in ("ln1", "q_proj", "k_proj", "v_proj", "o_proj", "ln2")] + ([w["router"]] if w["router"] is not None else [])
    if (lib is None or dt not in _DT or None in w["experts"]
            or any(t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu" for t in mats)):
        return None
    H, nh, nkv, hd = w["ln1"].shape[0], w["heads"], w["kv_heads"], w["head_dim"]
    operands = _ffn_operands(dt, H, w["router"], w["experts"], w["top_k"])
    if (operands is None or nh % nkv or w["q_proj"].shape != (nh * hd, H) or w["k_proj"].shape != (nkv * hd, H)
            or w["v_proj"].shape != (nkv * hd, H) or w["o_proj"].shape != (H, nh * hd)):
        return None
    wt, I, ffn = operands
    codes, sizes = (_DT[dt], wt), (H, nh, nkv, hd)
    weights = (_ptr(w["ln1"]), float(w["eps"]), *(_ptr(w[k]) for k in ("q_proj", "k_proj", "v_proj", "o_proj")))
    tail = (_ptr(w["ln2"]), _ptr(w["router"]), *ffn)
    held = tuple(mats) + tuple(t for e in w["experts"] for pair in e for t in pair if t is not None)
    return LayerPlan((codes, sizes, (I, len(w["experts"]), w["top_k"]), weights, tail), (_DT[dt], H, nkv, hd), held,
                          min(MAX_FFN_DECODE_ROWS, MAX_GEMV_ROWS[dt]))


def attention_layer_decode(plan: LayerPlan, x: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor,
                           pos: int) -> torch.Tensor | None:
    """The attention layer for ``x`` ``(b, hidden)`` fp32 in one kernel call: writes this token's K, V at
    ``pos`` of the stores ``(b, kv_heads, capacity, head_dim)`` and attends over positions ``0..pos``.
    Returns the new residual stream, or None when the inputs do not fit (the modules then run)."""
    _, H, nkv, hd = plan.dims
    b = x.shape[0]
    if (b == 0 or b > plan.max_rows or x.dtype != torch.float32 or x.shape[1] != H or not x.is_contiguous()
            or k_store.dtype != v_store.dtype or any(s.dtype not in _DT or s.shape[:2] != (b, nkv) or s.shape[3] != hd or s.shape[2] <= pos
                   or s.stride(3) != 1 or s.stride(2) != hd for s in (k_store, v_store))
            or k_store.stride()[:2] != v_store.stride()[:2]):
        return None
    codes, sizes, ffn_sizes, weights, tail = plan.args
    out = torch.empty_like(x)
    _lib().jl_attn_layer_decode(*codes, _DT[k_store.dtype], b, *sizes, pos, *ffn_sizes, x.data_ptr(), out.data_ptr(), *weights,
                                k_store.data_ptr(), v_store.data_ptr(), k_store.stride(0), k_store.stride(1), *tail,
                                _threads(b * H * hd * sizes[1]))
    return out


def flash_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`reference.attention_lse` by our flash kernel (``jl_flash``), or None where it does not apply (q, k, v
    not all fp32 or all bf16, head_dim not a multiple of 16, a CPU without AVX-512, bf16 without
    AVX512-BF16, or bf16 where torch's kernel is the faster one: `bf16_flash_ours`): the caller then runs
    torch's kernel. Scores, softmax and sums in fp32; with bf16 inputs P is rounded to bf16 before P.V, as
    torch's bf16 kernel does."""
    if q.dtype == torch.bfloat16 and not bf16_flash_ours():
        return None
    return _flash_ours(q, k, v, scale)


# Our bf16 flash kernel multiplies with AVX512-BF16 dot products; torch's CPU flash kernel with oneDNN's
# brgemm, which uses AMX tiles where the CPU has them. bench-small's past-key shape (2 KV heads x 4 query
# heads x 2,048 queries over 32K keys, head_dim 64, 2 threads): on the Zen 4 EPYC ours ~2x torch's; on an Intel
# Xeon with AMX-BF16 torch's 3.8x ours (0.18 s, 770 GFLOP/s, against 0.69 s, 200 GFLOP/s). fp32: ours 1.0-1.1x
# torch's on both, always ours. $JAMBA_LOCAL_BF16_FLASH: "auto" (measured once per thread count), "ours", "torch".
_bf16_flash_choice: dict[int, bool] = {}


def bf16_flash_ours() -> bool:
    """Whether bf16 attention over past keys runs on our flash kernel (else torch's): see above."""
    return _measured_choice("JAMBA_LOCAL_BF16_FLASH", {"ours": True, "torch": False}, _bf16_flash_choice, _measure_bf16_flash)


def _measure_bf16_flash(reps: int = 3) -> bool:
    """Time 2 x 512 bf16 queries over 4,096 keys (head_dim 64, 1 GFLOP) by both kernels, interleaved (about
    30 ms on the Xeon above); torch's wins only when clearly faster (20%), so noise near parity keeps ours.
    True (ours) where torch has no CPU flash kernel or ours does not apply."""
    torch_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).bfloat16() for n in (512, 4096, 4096))
    if torch_flash is None or _flash_ours(q, k, v, 0.125) is None:
        return True
    ours, theirs = [], []
    with torch.no_grad():
        for i in range(reps + 1):
            t = time.perf_counter()
            _flash_ours(q, k, v, 0.125)
            t1 = time.perf_counter()
            torch_flash(q, k, v, 0.0, False, scale=0.125)
            t2 = time.perf_counter()
            if i:  # the first round warms both up
                ours.append(t1 - t)
                theirs.append(t2 - t1)
    return not min(theirs) < 0.8 * min(ours)


def _flash_ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`flash_attention_lse` on our kernel whatever `bf16_flash_ours` says."""
    lib = _lib()
    if (lib is None or q.dtype not in _DT or k.dtype != q.dtype or v.dtype != q.dtype
            or q.device.type != "cpu" or q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]
            or q.shape[3] != k.shape[3] or any(t.stride(3) != 1 for t in (q, k, v))):
        return None
    B, NKV, R, hd = q.shape
    S = k.shape[2]
    out = torch.empty(B, NKV, R, hd, dtype=torch.float32)
    lse = torch.empty(B, NKV, R, dtype=torch.float32)
    done = lib.jl_flash(_DT[q.dtype], B, NKV, R, S, hd, q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3],
                        v.data_ptr(), *v.stride()[:3], float(scale), out.data_ptr(), lse.data_ptr(), _threads(R * S * hd))
    return (out, lse) if done else None


def can_build() -> bool:
    """Cheap check (no compile): a C++ compiler is on PATH."""
    return _compiler() is not None
