"""How close a benchmark result is to what the CPU can do: the CPU, its ISA, a measured fp32 matmul
roofline, and the vocoder's FLOPs per audio second counted from its layers.

- :func:`cpu_info`: the model name and the vector ISA from ``/proc/cpuinfo`` (AVX2 / AVX-512 / VNNI /
  AMX), plus any ISA cap set in the environment (``ONEDNN_MAX_CPU_ISA`` etc., see :data:`AVX2_ONLY`).
- :func:`vocoder_flops`: FLOPs per audio second of a ``vocos.Vocos`` (or any module with the same
  layers): 2 x multiply-adds of every Conv1d and Linear of its backbone and head per frame, plus the
  inverse real FFT of the ISTFT (2.5 n log2 n per frame), times frames per second. Counted from the
  module's shapes, so it follows whatever checkpoint the repository was built from.
  :func:`shape_flops` counts the same from a backbone shape (dim, intermediate_dim, num_layers, as a
  model's ``provenance.json`` records it) and the geometry, where no reference model is at hand.
- :func:`matmul_roofline`: the fp32 GFLOP/s that torch reaches on all cores on the vocoder's own
  Linear shapes (rows like a batch of 8 x 10 s), the best of the matmul implementations torch has
  (oneDNN fused, MKL via F.linear): the ceiling for a model whose FLOPs are >95% those matmuls.

``python load_tests/roofline.py [--rows 4096]`` prints the CPU and the roofline on its own.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

#: flags of /proc/cpuinfo -> the ISA names the bench prints (in this order)
ISA_FLAGS: Tuple[Tuple[str, str], ...] = (
    ("AVX2", "avx2"), ("FMA", "fma"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"),
    ("AVX-VNNI", "avx_vnni"), ("AVX-512 BF16", "avx512_bf16"), ("AVX-512 FP16", "avx512_fp16"),
    ("AMX", "amx_tile"), ("AMX BF16", "amx_bf16"), ("AMX INT8", "amx_int8"),
)
#: the environment that makes torch's CPU libraries use their AVX2 code only, as on an AVX2-only CPU
#: (oneDNN: matmuls and convolutions; MKL: F.linear's sgemm; fbgemm: int8; ATen: element-wise kernels)
AVX2_ONLY: Dict[str, str] = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int  # CPUs this process may run on
    isa: List[str]  # from ISA_FLAGS, present on the CPU
    caps: Dict[str, str] = field(default_factory=dict)  # ISA caps set in the environment (AVX2_ONLY's keys)

    @property
    def vector_isa(self) -> str:
        """The widest vector ISA the libraries may use: what the CPU has, capped by the environment."""
        widest = "AVX-512" if "AVX-512" in self.isa else "AVX2" if "AVX2" in self.isa else "SSE/AVX"
        return "AVX2" if widest == "AVX-512" and self.caps.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" else widest

    def describe(self) -> str:
        caps = f"; capped by {' '.join(f'{k}={v}' for k, v in sorted(self.caps.items()))}" if self.caps else ""
        return f"{self.model}, {self.cores} cores, ISA {' '.join(self.isa) or '(none of ours)'}{caps}"


def cpu_info(cpuinfo: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> CpuInfo:
    """The CPU from ``/proc/cpuinfo`` text (read when None; elsewhere than Linux: platform's name)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor speaks for all
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model=model, cores=cores, isa=[name for name, flag in ISA_FLAGS if flag in flags],
                   caps={k: env[k] for k in AVX2_ONLY if env.get(k)})


def _modules(vocos: nn.Module) -> List[nn.Module]:
    return [m for part in (vocos.backbone, vocos.head) for m in part.modules()]


def linear_shapes(vocos: nn.Module) -> List[Tuple[int, int]]:
    """(in, out) of every Linear layer of the backbone and head, in order (repeats included)."""
    return [(m.in_features, m.out_features) for m in _modules(vocos) if isinstance(m, nn.Linear)]


def vocoder_flops(vocos: nn.Module, sample_rate: int) -> Dict[str, float]:
    """FLOPs per frame and per audio second of a Vocos backbone + ISTFT head, from its layers' shapes."""
    per_frame = {"linear": 0.0, "conv": 0.0}
    for m in _modules(vocos):
        if isinstance(m, nn.Linear):
            per_frame["linear"] += 2.0 * m.in_features * m.out_features
        elif isinstance(m, nn.Conv1d):
            per_frame["conv"] += 2.0 * m.in_channels // m.groups * m.out_channels * m.kernel_size[0]
    istft = vocos.head.istft
    per_frame["fft"] = 2.5 * istft.n_fft * math.log2(istft.n_fft)
    frames_per_second = sample_rate / istft.hop_length
    total = sum(per_frame.values())
    return {"per_frame": total, **{f"{k}_share": v / total for k, v in per_frame.items()},
            "frames_per_second": frames_per_second, "per_audio_second": total * frames_per_second}


#: ConvNeXt's depthwise convolution and the backbone's input convolution (vocos.models.VocosBackbone)
CONVNEXT_KERNEL, EMBED_KERNEL = 7, 7


def shape_linear_shapes(backbone: Dict[str, int], n_fft: int) -> List[Tuple[int, int]]:
    """(in, out) of every Linear of a Vocos backbone + ISTFT head of this shape, as :func:`linear_shapes`."""
    dim, hidden = int(backbone["dim"]), int(backbone["intermediate_dim"])
    return [(dim, hidden), (hidden, dim)] * int(backbone["num_layers"]) + [(dim, n_fft + 2)]


def shape_flops(backbone: Dict[str, int], input_channels: int, n_fft: int, hop_length: int,
                sample_rate: int) -> Dict[str, float]:
    """What :func:`vocoder_flops` counts, from the backbone's shape and the geometry instead of a module:
    the input Conv1d (input_channels -> dim, kernel 7), per ConvNeXt block a depthwise Conv1d (kernel 7)
    and the two pointwise Linears (dim -> intermediate_dim -> dim), the head's Linear (dim -> n_fft + 2)
    and the inverse FFT. (The EnCodec-conditioned model's AdaLayerNorm is an Embedding lookup: no FLOPs.)"""
    dim, layers = int(backbone["dim"]), int(backbone["num_layers"])
    per_frame = {
        "linear": sum(2.0 * i * o for i, o in shape_linear_shapes(backbone, n_fft)),
        "conv": 2.0 * input_channels * dim * EMBED_KERNEL + layers * 2.0 * dim * CONVNEXT_KERNEL,
        "fft": 2.5 * n_fft * math.log2(n_fft),
    }
    frames_per_second = sample_rate / hop_length
    total = sum(per_frame.values())
    return {"per_frame": total, **{f"{k}_share": v / total for k, v in per_frame.items()},
            "frames_per_second": frames_per_second, "per_audio_second": total * frames_per_second}


@dataclass
class Roofline:
    gflops: float  # FLOP-weighted over the shapes, each at its fastest implementation
    by_shape: Dict[str, Dict[str, float]]  # "in x out" -> implementation -> GFLOP/s
    rows: int
    threads: int
    torch: str = torch.__version__

    def describe(self) -> str:
        return (f"{self.gflops:.0f} GFLOP/s fp32 matmul ({self.threads} threads, torch {self.torch}, "
                f"{self.rows} rows x the vocoder's Linear shapes, best implementation per shape)")


def _implementations() -> Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    impls = {"aten": lambda x, w, b: nn.functional.linear(x, w, b)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        impls["onednn"] = lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "none")
    return impls


def matmul_roofline(shapes: Sequence[Tuple[int, int]], rows: int = 4096, repeats: int = 5) -> Roofline:
    """Best-of-``repeats`` GFLOP/s of ``x (rows, in) @ W.T + b`` for each distinct shape, alternating the
    implementations; the roofline is the FLOP-weighted rate over ``shapes`` (with their repeats)."""
    generator = torch.Generator().manual_seed(0)
    impls = _implementations()
    best: Dict[Tuple[int, int], Dict[str, float]] = {}
    with torch.inference_mode():
        for shape in sorted(set(shapes)):
            n_in, n_out = shape
            x = torch.randn(rows, n_in, generator=generator)
            w, b = torch.randn(n_out, n_in, generator=generator) * 0.05, torch.zeros(n_out)
            seconds: Dict[str, List[float]] = {name: [] for name in impls}
            for round_index in range(repeats + 1):
                for name, impl in impls.items():
                    started = time.perf_counter()
                    impl(x, w, b)
                    if round_index:  # the first round warms up (oneDNN creates its primitive)
                        seconds[name].append(time.perf_counter() - started)
            flop = 2.0 * rows * n_in * n_out
            best[shape] = {name: flop / min(s) / 1e9 for name, s in seconds.items()}
    total_flop = sum(2.0 * rows * i * o for i, o in shapes)
    total_seconds = sum(2.0 * rows * i * o / (max(best[(i, o)].values()) * 1e9) for i, o in shapes)
    return Roofline(gflops=total_flop / total_seconds / 1e9,
                    by_shape={f"{i}x{o}": rates for (i, o), rates in best.items()},
                    rows=rows, threads=torch.get_num_threads())


def weighted_gflops(roofline: Roofline, shapes: Sequence[Tuple[int, int]]) -> float:
    """The roofline of one model out of a measurement over several models' shapes: the FLOP-weighted rate over
    ``shapes`` (with their repeats), each at its fastest implementation (every shape must have been measured)."""
    rates = {shape: max(r.values()) for shape, r in roofline.by_shape.items()}
    total_flop = sum(i * o for i, o in shapes)
    return total_flop / sum(i * o / rates[f"{i}x{o}"] for i, o in shapes)


def roofline_fractions(rows: List[dict], flops_per_audio_second: Dict[str, float], roofline_gflops: float,
                       systems: Sequence[str]) -> List[dict]:
    """Each bench row's real-time factors as fractions of the roofline: rtf x FLOPs per audio s / roofline."""
    out = []
    for row in rows:
        flops = flops_per_audio_second[row["variant"]]
        out.append({**{k: row[k] for k in ("variant", "seconds", "batch")},
                    "ceiling_rtf": roofline_gflops * 1e9 / flops,
                    "fraction": {s: row["rtf"][s] * flops / (roofline_gflops * 1e9) for s in systems}})
    return out


def print_fractions(fractions: List[dict], systems: Sequence[str]) -> None:
    print(f"\n{'variant':8} {'clip':>5} {'batch':>5} | {'ceiling':>8} | "
          + " ".join(f"{s:>10}" for s in systems) + "   (fraction of the matmul roofline)")
    for f in fractions:
        print(f"{f['variant']:8} {f['seconds']:>4}s {f['batch']:>5} | {f['ceiling_rtf']:>7.1f}x | "
              + " ".join(f"{f['fraction'][s]:>10.2f}" for s in systems))
    if any(v > 1 for f in fractions for v in f["fraction"].values()):
        print("note: fractions above 1 mean the roofline was measured low: other processes were using the cores")


def machine_report(references: Dict[str, nn.Module], sample_rate: int, rows: int = 4096) -> dict:
    """CPU, ISA, roofline (measured on the references' Linear shapes) and each variant's FLOPs."""
    cpu = cpu_info()
    flops = {variant: vocoder_flops(vocos, sample_rate) for variant, vocos in references.items()}
    shapes = [s for vocos in references.values() for s in linear_shapes(vocos)]
    roofline = matmul_roofline(shapes, rows=rows)
    return {"cpu": asdict(cpu), "cpu_description": cpu.describe(), "vector_isa": cpu.vector_isa,
            "roofline": asdict(roofline), "roofline_description": roofline.describe(), "flops": flops}


def print_machine(report: dict) -> None:
    print(f"CPU: {report['cpu_description']}")
    print(f"vector ISA used: {report['vector_isa']}")
    print(f"roofline: {report['roofline_description']}")
    gflops = report["roofline"]["gflops"]
    for variant, f in report["flops"].items():
        print(f"vocoder {variant}: {f['per_audio_second'] / 1e9:.2f} GFLOP per audio second "
              f"(linear {f['linear_share']:.0%}, conv {f['conv_share']:.0%}, FFT {f['fft_share']:.0%}); "
              f"ceiling {gflops * 1e9 / f['per_audio_second']:.1f}x real time")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--shapes", default="512x1536,1536x512,512x1026",
                        help="comma-separated IN x OUT Linear shapes (default: the mel vocoder's)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    print(f"CPU: {cpu_info().describe()}")
    roofline = matmul_roofline(shapes, rows=args.rows)  # type: ignore[arg-type]
    print(f"roofline: {roofline.describe()}")
    for shape, rates in roofline.by_shape.items():
        print(f"  {shape:>10}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rates.items())) + " GFLOP/s")
    print(f"(median of shapes' best: {statistics.median(max(r.values()) for r in roofline.by_shape.values()):.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
