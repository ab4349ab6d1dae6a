"""Config consistency of the committed model repository: the commonest Triton mistakes, caught cheaply."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from vocos_triton.launcher import profiles

from triton_helpers import implementation_import

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
CONTRACT_CHECKER = REPOSITORY.parent.parent / "shared" / "tools" / "check_contract.py"
CONFIGS = {p.parent.name: profiles.load_config(p) for p in sorted(REPOSITORY.glob("*/config.pbtxt"))}
PYTHON_MODELS = sorted(n for n, c in CONFIGS.items() if c.backend == "python" and not c.HasField("sequence_batching"))
STREAMS = sorted(n for n, c in CONFIGS.items() if c.HasField("sequence_batching"))
ENSEMBLES = sorted(n for n, c in CONFIGS.items() if c.platform == "ensemble")


@pytest.mark.parametrize("name", PYTHON_MODELS + STREAMS)
def test_every_model_py_lowers_its_priority_before_it_imports_its_implementation(name):
    """A stub's first act (serving/priority.py): the imports after it (numpy, torch for the streams) are a
    replacement's start, which would otherwise run ahead of the instances serving beside it."""
    source = (REPOSITORY / name / "1" / "model.py").read_text()
    docstring, first, call, entry, *_ = ast.parse(source).body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    assert isinstance(first, ast.ImportFrom) and first.module == "vocos_triton.serving.priority"
    assert [a.name for a in first.names] == ["lower_compute_priority"]
    assert ast.unparse(call) == "lower_compute_priority()"
    assert ast.unparse(entry) == ast.unparse(implementation_import(source))


def tensors(config, kind):
    return {t.name: (t.data_type, list(t.dims)) for t in getattr(config, kind)}


def test_every_contract_model_is_here():
    assert PYTHON_MODELS == ["encodec_embedding", "encodec_encoder", "mel_features", "vocos_encodec", "vocos_mel"]
    assert ENSEMBLES == ["decode_codes", "resynthesize_encodec", "resynthesize_mel"]
    assert STREAMS == ["decode_codes_stream", "vocos_mel_stream"]


@pytest.mark.parametrize("name", STREAMS)
def test_streams_are_decoupled_sequences_whose_chunks_share_a_step(name):
    config = CONFIGS[name]
    assert config.model_transaction_policy.decoupled and config.max_batch_size > 0
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds > 0, "abandoned streams must be freed"
    params = {k: v.string_value for k, v in config.parameters.items()}
    # Triton must hand the stub more sequences than it serves, so an extra stream is refused at once
    assert batching.oldest.max_candidate_sequences > int(params["max_open_sequences"])
    assert int(params["lookahead_frames"]) == 29 and int(params["max_piece_frames"]) > 0
    for t in config.input:
        assert t.allow_ragged_batch == (-1 in t.dims), f"{name}.{t.name}: ragged iff variable length"
    source = (REPOSITORY / name / "1" / "model.py").read_text()
    assert "vocos_triton.serving.streaming" in source and len(source.splitlines()) < 10


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_names_match_folders_and_versions_exist(name):
    assert CONFIGS[name].name == name
    assert (REPOSITORY / name / "1").is_dir()


@pytest.mark.parametrize("name", PYTHON_MODELS)
def test_python_models_batch_raggedly_and_delegate_to_the_package(name):
    config = CONFIGS[name]
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    for t in config.input:
        assert t.allow_ragged_batch == (-1 in t.dims), f"{name}.{t.name}: ragged iff variable length"
    source = (REPOSITORY / name / "1" / "model.py").read_text()
    entry = implementation_import(source)
    # the numpy models have their own torch-free modules; the others share serving.models
    module = {"encodec_embedding": "vocos_triton.serving.embedding",
              "mel_features": "vocos_triton.serving.frontend"}.get(name, "vocos_triton.serving.models")
    assert entry.module == module, "model.py stays thin"
    (alias,) = entry.names
    assert alias.asname == "TritonPythonModel" and hasattr(importlib.import_module(module), alias.name)
    assert len(source.splitlines()) < 10
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert float(params["max_seconds"]) == 60 and int(params["max_padded_frames"]) > 0


@pytest.mark.parametrize("name", PYTHON_MODELS)
def test_python_models_have_bounded_queues_that_honour_the_callers_deadline(name):
    """docs/exposure.md: a full queue refuses at once, a request whose deadline passed leaves the queue."""
    policy = CONFIGS[name].dynamic_batching.default_queue_policy
    assert 8 <= policy.max_queue_size <= 256, "bounded, and room for a few full batches"
    assert policy.timeout_action == policy.REJECT and policy.allow_timeout_override
    assert 0 < policy.default_timeout_microseconds <= 120_000_000


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_graph_resolves_with_matching_types_and_dims(name):
    config = CONFIGS[name]
    available = tensors(config, "input")  # tensor name in the ensemble -> (dtype, dims)
    assert not set(available) & set(tensors(config, "output")), "an input named like an output loops in 2.51"
    for step in config.ensemble_scheduling.step:
        model = CONFIGS[step.model_name]
        assert config.max_batch_size <= model.max_batch_size
        model_inputs, model_outputs = tensors(model, "input"), tensors(model, "output")
        assert set(step.input_map) == set(model_inputs), f"{name}: {step.model_name} inputs"
        for model_tensor, ensemble_tensor in step.input_map.items():
            assert ensemble_tensor in available, f"{name}: {ensemble_tensor} used before it is made"
            assert available[ensemble_tensor] == model_inputs[model_tensor], f"{name}: {ensemble_tensor} type/dims"
        for model_tensor, ensemble_tensor in step.output_map.items():
            available[ensemble_tensor] = model_outputs[model_tensor]
    for output, spec in tensors(config, "output").items():
        assert available.get(output) == spec, f"{name}: output {output} never produced with these type/dims"


def test_gpu_profiles_are_rendered_from_the_cpu_configs():
    for path, text in profiles.render_all(REPOSITORY).items():
        assert path.read_text() == text, f"{path} is stale: run python -m vocos_triton.launcher.profiles"
        gpu = profiles.load_config(path)
        cpu = CONFIGS[path.parent.parent.name]
        assert [g.kind for g in gpu.instance_group] == [profiles.mc.ModelInstanceGroup.Kind.KIND_GPU] * len(
            cpu.instance_group)
        # the groups keep their identities (name, host_policy): the watchdog replaces one instance by them
        assert [(g.name, g.host_policy, g.count) for g in gpu.instance_group] == [
            (g.name, g.host_policy, g.count) for g in cpu.instance_group]
        gpu.ClearField("instance_group")
        cpu_without_groups = type(cpu)()
        cpu_without_groups.CopyFrom(cpu)
        cpu_without_groups.ClearField("instance_group")
        assert gpu == cpu_without_groups


@pytest.mark.skipif(not CONTRACT_CHECKER.exists(), reason="shared contract checker not beside this checkout")
def test_shared_contract_checker_passes():
    result = subprocess.run([sys.executable, str(CONTRACT_CHECKER), str(REPOSITORY)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
