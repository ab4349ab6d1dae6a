"""The bench's variant table: every served variant's vocoder beside the default one, in one run.

For each variant the repository serves (folders ``vocos_mel__NAME`` / ``vocos_encodec__NAME``, built with
``python -m vocos_triton.build.export --variant NAME=SOURCE``) and, as the baseline, the default variant's
vocoder of the same kind (``vocos_mel``; ``decode_codes``' ``vocos_encodec`` when an EnCodec variant is
served), at 1 s and 10 s clips of the vocoder's own sample rate (frames = ``geometry.frames(seconds x
rate)``), batch 1:

- the real-time factor (audio seconds per wall second) of its TorchScript module in-process (a worker
  on the serving runtime, as ``bench.py``'s in-process column: this file, started as a script) and served
  through Triton (``VocosClient.synthesize(..., variant=NAME)``, concurrency 1), every vocoder and both
  systems interleaved round by round so that machine noise hits them alike (warm-up rounds, then the
  median of the repeats);
- its fraction of the matmul roofline: real-time factor x the vocoder's FLOPs per audio second
  (``roofline.vocoder_flops`` of the reference model built from the checkpoint its ``provenance.json``
  names; where that cannot be built, ``roofline.shape_flops`` of the backbone shape the provenance
  records) over the fp32 matmul rate measured on that vocoder's own Linear shapes, before the server
  starts;
- the idle PSS of each variant's stubs (``memory.process_tree`` / ``stub_identity`` / ``pss_kb`` of the
  running tritonserver, right after start-up). The default variant runs two instances of its batched
  models, a variant one, and the EnCodec encoder (shared by every variant) counts to the default.

``bench.py`` runs it (``--variants``, on by default when the repository has variants; ``--only-variants``
runs only this table and writes ``variants.json``). The in-process worker, started by the bench with the
serving runtime's python, speaks ``inprocess_worker.py``'s protocol (``run <case>`` -> seconds; ``quit``);
its cases are ``<model>@<seconds>s`` with the input ``<case>.mel`` (1, C, T) or ``<case>.codes`` (1, K, T)::

    python variant_bench.py REPOSITORY INPUTS.npz THREADS
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vocos_triton.contract import (
    CODEBOOK_SIZE,
    CODEBOOKS,
    DEFAULT_VARIANT,
    ENCODEC,
    MEL,
    VARIANT_SEPARATOR,
    VOCODERS,
    Bandwidth,
    Geometry,
    Model,
    split_model_name,
    variant_model,
)
from vocos_triton.launcher.memory import process_tree, pss_kb, stub_identity
from vocos_triton.launcher.preflight import PROVENANCE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # roofline.py: next to this file
import inprocess_worker  # noqa: E402
import roofline  # noqa: E402

#: this file: the in-process worker the bench starts for the variant rows
WORKER = Path(__file__).resolve()
BANDWIDTH = 6.0  # EnCodec variants: 8 codebooks, as bench.py's EnCodec rows
SYSTEMS = ("in-process", "triton")
Log = Callable[..., None]


@dataclass
class Vocoder:
    """One benchmarked vocoder: a variant's, or the default variant's of the same kind."""

    variant: str  # DEFAULT_VARIANT or the variant's name
    model: str  # the Triton name: vocos_mel, vocos_mel__NAME, vocos_encodec__NAME
    kind: str  # MEL or ENCODEC
    geometry: Geometry
    backbone: Dict[str, int]  # dim, intermediate_dim, num_layers (provenance.json)
    sources: Dict[str, dict]  # provenance.json's "sources"
    reference: Optional[torch.nn.Module] = None  # vocos.Vocos from the checkpoint, when it can be built
    flops: Dict[str, float] = field(default_factory=dict)
    flops_from: str = ""  # "reference" (roofline.vocoder_flops) or "backbone shape" (roofline.shape_flops)
    roofline_gflops: float = 0.0  # the matmul roofline on this vocoder's own Linear shapes

    @property
    def entry_variant(self) -> Optional[str]:
        """The client's ``variant=`` (None: the default)."""
        return None if self.variant == DEFAULT_VARIANT else self.variant

    def linear_shapes(self) -> List[Tuple[int, int]]:
        if self.reference is not None:
            return roofline.linear_shapes(self.reference)
        return roofline.shape_linear_shapes(self.backbone, self.geometry.n_fft)

    def describe(self) -> dict:
        return {"variant": self.variant, "model": self.model, "kind": self.kind,
                "geometry": self.geometry.parameters(), "geometry_description": self.geometry.describe(),
                "backbone": self.backbone, "flops": self.flops, "flops_from": self.flops_from,
                "roofline_gflops": self.roofline_gflops,
                "ceiling_rtf": self.roofline_gflops * 1e9 / self.flops["per_audio_second"]}


def _provenance(repository: Path, model: str) -> dict:
    return json.loads((repository / model / "1" / PROVENANCE).read_text())


def variant_models(repository: Path) -> List[str]:
    """The variants' vocoders the repository holds (``vocos_mel__*``, ``vocos_encodec__*``), sorted."""
    return sorted(folder.name for vocoder in VOCODERS.values()
                  for folder in repository.glob(f"{vocoder}{VARIANT_SEPARATOR}*") if (folder / "1").is_dir())


def find_vocoders(repository: Path) -> List[Vocoder]:
    """The default vocoder of each kind a variant has, then every variant's vocoder; [] without variants."""
    names = variant_models(repository)
    defaults = [VOCODERS[kind] for kind in (MEL, ENCODEC)
                if any(split_model_name(name)[0] == VOCODERS[kind] for name in names)]
    kinds = {vocoder: kind for kind, vocoder in VOCODERS.items()}
    found: List[Vocoder] = []
    for model in defaults + names:
        provenance = _provenance(repository, model)
        base, variant = split_model_name(model)
        kind = kinds[base]
        found.append(Vocoder(variant=variant, model=model, kind=kind,
                             geometry=Geometry.from_parameters(provenance["geometry"], str(model)),
                             backbone={k: int(v) for k, v in (provenance.get("backbone") or {}).items()},
                             sources=provenance.get("sources", {})))
    return found


def build_reference(vocoder: Vocoder) -> Optional[torch.nn.Module]:
    """The reference ``vocos.Vocos`` from the checkpoint the provenance names, or None when it is not there
    any more (the FLOPs then come from the backbone shape)."""
    from vocos_triton.build import checkpoints as ck  # the build environment's (vocos, torchaudio)

    try:
        checkpoint = ck.load_vocos_checkpoint(vocoder.sources[f"vocos_{vocoder.kind}"]["directory"], vocoder.kind)
        encodec = (ck.load_encodec_checkpoint(vocoder.sources["encodec_24khz"]["path"])
                   if vocoder.kind == ENCODEC else None)
        return ck.build_reference_vocos(checkpoint, encodec)
    except (KeyError, OSError, ck.CheckpointError):
        return None


def count_flops(vocoder: Vocoder, log: Log) -> None:
    """The vocoder's FLOPs from its reference, else from its backbone shape; the two counts must agree."""
    g = vocoder.geometry
    from_shape = (roofline.shape_flops(vocoder.backbone, g.input_channels, g.n_fft, g.hop_length, g.sample_rate)
                  if vocoder.backbone else None)
    if vocoder.reference is not None:
        vocoder.flops, vocoder.flops_from = roofline.vocoder_flops(vocoder.reference, g.sample_rate), "reference"
        if from_shape and abs(from_shape["per_frame"] / vocoder.flops["per_frame"] - 1) > 1e-6:
            log("%s: the backbone shape in provenance.json (%s) counts %.4g FLOPs per frame, its reference %.4g",
                vocoder.model, vocoder.backbone, from_shape["per_frame"], vocoder.flops["per_frame"])
    elif from_shape is not None:
        vocoder.flops, vocoder.flops_from = from_shape, "backbone shape"
    else:
        raise RuntimeError(f"{vocoder.model}: neither its checkpoint nor a backbone shape in its provenance.json; "
                           "rebuild the repository")


def make_input(vocoder: Vocoder, seconds: int) -> np.ndarray:
    """Batch 1 input of ``seconds`` of audio at the vocoder's rate: the reference's log-mel of a speech clip
    (seeded random log-mel without a reference); EnCodec: seeded random codes at :data:`BANDWIDTH`."""
    g = vocoder.geometry
    samples = seconds * g.sample_rate
    frames = g.frames(samples)
    generator = np.random.default_rng(seconds)
    if vocoder.kind == ENCODEC:
        codebooks = Bandwidth.parse(BANDWIDTH).codebooks
        return generator.integers(0, CODEBOOK_SIZE, (1, codebooks, frames), dtype=np.int64)
    if vocoder.reference is None:
        return generator.normal(-4.0, 2.0, (1, g.input_channels, frames)).astype(np.float32)
    from vocos_triton.speech import speech_clip

    with torch.inference_mode():
        mel = vocoder.reference.feature_extractor(torch.from_numpy(speech_clip(samples, seed=seconds))[None])
    if tuple(mel.shape) != (1, g.input_channels, frames):
        raise RuntimeError(f"{vocoder.model}: the reference made a mel of shape {tuple(mel.shape)} from {samples} "
                           f"samples, the geometry ({g.describe()}) says (1, {g.input_channels}, {frames})")
    return mel.numpy()


@dataclass
class Plan:
    """What :func:`prepare` sets up before the server starts: the vocoders, their inputs and the roofline."""

    vocoders: List[Vocoder]
    seconds: List[int]
    inputs: Dict[str, np.ndarray]  # "<model>@<seconds>s.<mel|codes>" -> (1, C or K, T)
    cpu: roofline.CpuInfo
    roofline: roofline.Roofline


def case_name(vocoder: Vocoder, seconds: int) -> str:
    return f"{vocoder.model}@{seconds}s"


def prepare(repository: Path, seconds: Sequence[int], log: Log) -> Plan:
    """Vocoders, references, FLOPs, inputs and the matmul roofline (measured here: call it before the server
    starts, the roofline needs the cores to itself)."""
    vocoders = find_vocoders(repository)
    if not vocoders:
        raise RuntimeError(f"{repository}: no variants (no vocos_mel__* / vocos_encodec__* folders); build them with "
                           "python -m vocos_triton.build.export --variant NAME=SOURCE")
    inputs: Dict[str, np.ndarray] = {}
    for vocoder in vocoders:
        vocoder.reference = build_reference(vocoder)
        count_flops(vocoder, log)
        for s in seconds:
            inputs[f"{case_name(vocoder, s)}.{'codes' if vocoder.kind == ENCODEC else 'mel'}"] = \
                make_input(vocoder, s)
    cpu = roofline.cpu_info()
    log("variant table: roofline on the Linear shapes of %s", ", ".join(v.model for v in vocoders))
    measured = roofline.matmul_roofline([s for v in vocoders for s in v.linear_shapes()])
    for vocoder in vocoders:
        vocoder.roofline_gflops = roofline.weighted_gflops(measured, vocoder.linear_shapes())
        vocoder.reference = None  # the inputs are made; free the memory before the server starts
    return Plan(vocoders=vocoders, seconds=list(seconds), inputs=inputs, cpu=cpu, roofline=measured)


def variant_memory(pid: int) -> Dict[str, object]:
    """PSS of the stubs of each variant's models in tritonserver ``pid``'s process tree, and of the rest
    (tritonserver itself): ``{"variants": {variant: {"mb", "stubs", "models": {model: mb}}}, "server_mb"}``."""
    variants: Dict[str, dict] = {}
    server_mb = 0.0
    for child in process_tree(pid):
        identity = stub_identity(child)
        try:
            mb = pss_kb(child) / 1024
        except OSError:  # exited meanwhile
            continue
        if identity is None:
            server_mb += mb
            continue
        model = identity[0]
        entry = variants.setdefault(split_model_name(model)[1], {"mb": 0.0, "stubs": 0, "models": {}})
        entry["mb"] += mb
        entry["stubs"] += 1
        entry["models"][model] = entry["models"].get(model, 0.0) + mb
    return {"variants": variants, "server_mb": server_mb}


@dataclass
class Row:
    vocoder: Vocoder
    seconds: int
    runners: Dict[str, object] = field(default_factory=dict)  # system -> worker case name, or a callable
    times: Dict[str, List[float]] = field(default_factory=dict)

    def rtf(self, system: str) -> float:
        return self.seconds / statistics.median(self.times[system])


def triton_call(client, vocoder: Vocoder, item: np.ndarray) -> Callable[[], object]:
    """One batch-1 request of ``vocoder``'s variant through the SDK (mel -> ``vocos_mel[__NAME]``; codes ->
    ``decode_codes[__NAME]``, whose vocoder is ``vocos_encodec[__NAME]``)."""
    if vocoder.kind == ENCODEC:
        return lambda: client.synthesize(codes=item[0], bandwidth=BANDWIDTH, variant=vocoder.entry_variant)
    return lambda: client.synthesize(mel=item[0], variant=vocoder.entry_variant)


def run(plan: Plan, client, start_worker: Callable[[Dict[str, np.ndarray]], object], repeats: int,
        memory_idle: Dict[str, object], log: Log) -> dict:
    """Measure the plan's rows in-process (``start_worker(inputs)``: a worker of this file on the serving
    runtime) and through ``client``; the report :func:`print_report` prints."""
    rows = []
    for vocoder in plan.vocoders:
        for s in plan.seconds:
            key = next(k for k in plan.inputs if k.startswith(case_name(vocoder, s) + "."))
            rows.append(Row(vocoder, s, {"in-process": case_name(vocoder, s),
                                         "triton": triton_call(client, vocoder, plan.inputs[key])}))
    worker = start_worker(plan.inputs)
    try:
        log("variant table: %d vocoders x %s s x 2 systems, batch 1, %d repeats; in-process worker: %s",
            len(plan.vocoders), "/".join(map(str, plan.seconds)), repeats, worker.banner)
        inprocess_worker.round_robin(rows, worker, repeats)
    finally:
        worker.close()
    return report(plan, rows, memory_idle, worker.banner)


def report(plan: Plan, rows: List[Row], memory_idle: Dict[str, object], worker_banner: str) -> dict:
    baseline = {(r.vocoder.kind, r.seconds): r for r in rows if r.vocoder.variant == DEFAULT_VARIANT}
    default_flops = {v.kind: v.flops for v in plan.vocoders if v.variant == DEFAULT_VARIANT}
    out_rows = []
    for r in rows:
        v, base = r.vocoder, baseline[(r.vocoder.kind, r.seconds)]
        rtf = {s: r.rtf(s) for s in SYSTEMS}
        out_rows.append({
            "variant": v.variant, "model": v.model, "kind": v.kind, "seconds": r.seconds, "batch": 1,
            "frames": int(plan.inputs[next(k for k in plan.inputs if k.startswith(case_name(v, r.seconds) + "."))]
                          .shape[-1]),
            "rtf": rtf, "median_s": {s: statistics.median(t) for s, t in r.times.items()},
            "vs_default": {s: rtf[s] / base.rtf(s) for s in SYSTEMS},
            "roofline_fraction": {s: rtf[s] * v.flops["per_audio_second"] / (v.roofline_gflops * 1e9)
                                  for s in SYSTEMS},
        })
    vocoders = []
    for v in plan.vocoders:
        described = v.describe()
        described["flops_per_frame_vs_default"] = v.flops["per_frame"] / default_flops[v.kind]["per_frame"]
        described["flops_per_audio_second_vs_default"] = (v.flops["per_audio_second"]
                                                          / default_flops[v.kind]["per_audio_second"])
        vocoders.append(described)
    return {"cpu": asdict(plan.cpu), "cpu_description": plan.cpu.describe(), "vector_isa": plan.cpu.vector_isa,
            "roofline": asdict(plan.roofline), "roofline_description": plan.roofline.describe(),
            "vocoders": vocoders, "rows": out_rows, "memory_idle": memory_idle,
            "in_process_worker": worker_banner}


def _backbone(shape: Dict[str, int]) -> str:
    return f"{shape['dim']}/{shape['intermediate_dim']}/{shape['num_layers']}" if shape else "?"


def print_report(result: dict) -> None:
    print(f"\nVariants: CPU {result['cpu_description']}; vector ISA used {result['vector_isa']}")
    print(f"roofline: {result['roofline_description']}")
    width = {key: max(len(key), *(len(v[key]) for v in result["vocoders"]))
             for key in ("variant", "model", "geometry_description")}
    variant, model, geometry = width["variant"], width["model"], width["geometry_description"]
    print(f"\n{'variant':{variant}} {'model':{model}} {'geometry':{geometry}} {'backbone':>12} | {'MFLOP/frame':>11} "
          f"{'x default':>9} {'GFLOP/audio s':>13} {'x default':>9} | {'roofline':>8} {'ceiling':>8}   (FLOPs from)")
    for v in result["vocoders"]:
        f = v["flops"]
        print(f"{v['variant']:{variant}} {v['model']:{model}} {v['geometry_description']:{geometry}} "
              f"{_backbone(v['backbone']):>12} | "
              f"{f['per_frame'] / 1e6:>11.1f} {v['flops_per_frame_vs_default']:>8.2f}x "
              f"{f['per_audio_second'] / 1e9:>13.2f} {v['flops_per_audio_second_vs_default']:>8.2f}x | "
              f"{v['roofline_gflops']:>8.0f} {v['ceiling_rtf']:>7.1f}x   ({v['flops_from']})")
    print("(roofline: GFLOP/s of fp32 matmul on the vocoder's own Linear shapes; ceiling: the real-time factor at it)")
    variant = max(variant, len("tritonserver"))
    print(f"\n{'variant':{variant}} {'clip':>5} {'frames':>6} | {'in-process':>10} {'triton':>10} | "
          f"{'triton/in-proc':>14} | {'vs default':>10} | {'in-process':>10} {'triton':>7}")
    print(f"{'':{variant}} {'':>5} {'':>6} | {'real-time factor':^21} | {'':>14} | {'(in-proc)':>10} | "
          f"{'fraction of roofline':^18}")
    for r in result["rows"]:
        rtf, frac = r["rtf"], r["roofline_fraction"]
        print(f"{r['variant']:{variant}} {r['seconds']:>4}s {r['frames']:>6} | {rtf['in-process']:>9.1f}x "
              f"{rtf['triton']:>9.1f}x | {rtf['triton'] / rtf['in-process']:>13.2f}x | "
              f"{r['vs_default']['in-process']:>9.2f}x | {frac['in-process']:>10.2f} {frac['triton']:>7.2f}")
    print("(batch 1; real-time factor: audio s per wall s at the vocoder's own rate; triton: VocosClient, c=1)")
    if any(v > 1 for r in result["rows"] for v in r["roofline_fraction"].values()):
        print("note: fractions above 1 mean the roofline was measured low: other processes were using the cores")
    memory = result["memory_idle"]
    print(f"\n{'variant':{variant}} {'stubs':>5} {'idle PSS':>9}   models (MB)")
    for name, entry in sorted(memory["variants"].items(), key=lambda kv: (kv[0] != DEFAULT_VARIANT, kv[0])):
        models = ", ".join(f"{m} {mb:.0f}" for m, mb in sorted(entry["models"].items()))
        print(f"{name:{variant}} {entry['stubs']:>5} {entry['mb']:>6.0f} MB   {models}")
    total = sum(e["mb"] for e in memory["variants"].values()) + memory["server_mb"]
    print(f"{'tritonserver':{variant}} {'':>5} {memory['server_mb']:>6.0f} MB   (not a stub); all: {total:.0f} MB")
    print("(PSS after start-up, before any request; the default variant runs two instances of its batched models "
          "and the shared EnCodec encoder, a variant one instance of each)")


# -- the in-process worker (run with the serving runtime's python) ---------------------------------------
def worker_calls(repository: Path, inputs: Dict[str, np.ndarray]) -> Tuple[Dict[str, Callable[[], object]], str]:
    """The timed call of each case, and the Linear kernels the vocoders chose (as their stubs do at load)."""
    from vocos_triton.serving.codebooks import TABLE_FILE, CodebookTable
    from vocos_triton.serving.kernels import choose_linear_kernel, switchable
    from vocos_triton.serving.models import VocosEncodecModel, VocosMelModel, vocoder_probe
    from vocos_triton.serving.torchscript import ARTIFACT

    modules: Dict[str, torch.jit.ScriptModule] = {}
    kernels: List[str] = []
    calls: Dict[str, Callable[[], object]] = {}
    for key, array in inputs.items():
        case, kind = key.rsplit(".", 1)
        model = case.split("@")[0]
        if model not in modules:
            module = modules[model] = torch.jit.load(str(repository / model / "1" / ARTIFACT)).eval()
            geometry = Geometry.from_parameters(_provenance(repository, model)["geometry"], model)
            condition = (VocosEncodecModel if geometry.kind == ENCODEC else VocosMelModel).probe_condition
            if switchable(module):
                choice = choose_linear_kernel(module, vocoder_probe(geometry, condition), model=model)
                kernels.append(f"{model}: {choice.describe()}")
        module, frames = modules[model], torch.tensor([array.shape[-1]])
        if kind == "mel":
            mel, zeros = torch.from_numpy(array), torch.zeros(1, dtype=torch.long)
            calls[case] = lambda m=module, x=mel, f=frames, z=zeros: m(x, f, z)
        else:  # what decode_codes runs: encodec_embedding's table, then the vocoder
            table = CodebookTable.load(repository / variant_model(Model.ENCODEC_EMBEDDING, split_model_name(model)[1])
                                       / "1" / TABLE_FILE)
            ids = torch.tensor([CODEBOOKS.index(array.shape[1])])
            calls[case] = lambda m=module, c=array, t=table, f=frames, i=ids: m(
                torch.from_numpy(np.stack([t.features(item) for item in c])), f, i)
    return calls, "; ".join(kernels)


def worker_main(argv: Sequence[str]) -> int:
    return inprocess_worker.serve(argv, worker_calls)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
