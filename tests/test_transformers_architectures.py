"""Every experts class of the installed transformers that uses the experts interface
(``@use_experts_implementation``) runs with ``experts_implementation="fastmoe"`` and equals eager:
outputs and the gradients of the input and every parameter, in fp32, from a tiny random config.

The classes are found by scanning transformers' model sources, so a new architecture is covered as
soon as transformers ships it. A class is skipped only when it cannot be built from its config, with
the reason printed. The activations the issue named are also checked to run fused (not the generic path).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra: pip install .[transformers]")

import fastmoe_kernels.integrations.transformers  # noqa: E402,F401  (registers "fastmoe" on import)
from fastmoe_kernels.hf_gate import fused_activation  # noqa: E402
from tolerances import tol  # noqa: E402

NUM_EXPERTS, HIDDEN, INTERMEDIATE, TOKENS, TOP_K = 4, 32, 16, 9, 2
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
WIDTH_FIELDS = ("intermediate_size", "moe_intermediate_size")
DECORATED = re.compile(r"^@use_experts_implementation(?:\(.*?\))?\s*\nclass (\w+)\(", re.M | re.S)

# What the models must run fused as: model type → (activation, interleaved). Checked where installed.
EXPECTED_FUSED = {
    "gpt_oss": ("swiglu_oai", True), "openai_privacy_filter": ("swiglu_oai", False),
    "minimax_m3_vl": ("swiglu_oai", False), "deepseek_v4": ("swiglu", False), "glm5_next": ("swiglu", False),
    "hy_v4": ("swiglu", False), "beam": ("swiglu", False), "gemma4": ("geglu_tanh", False),
    "diffusion_gemma": ("geglu_tanh", False), "lfm2_moe": ("swiglu", False), "nemotron_h": ("relu2", False),
    "mixtral": ("swiglu", False),
}
# And what must take the generic path: a softcapped gate, a post-expert norm.
EXPECTED_GENERIC = {"inkling2", "muse_spark"}
KERNEL_BACKENDS = ["triton", "cuda" if torch.cuda.is_available() else "cpp"]


def discover():
    """(model type, experts class name) of every decorated experts class, in source order."""
    root = Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        if "@use_experts_implementation" in text:
            found += [(path.parent.name, path.stem, name) for name in DECORATED.findall(text)]
    return found


CLASSES = discover()


def _has_expert_count(config) -> bool:
    return any(hasattr(config, name) for name in EXPERT_COUNT_FIELDS)


def _config(module, experts_cls):
    """A default instance of the config the experts' ``__init__`` takes: of its annotation, then of the
    module's config classes by the length of the name they share with the experts class, the first
    that holds an expert count (itself or a nested config: composite models nest it)."""
    annotation = inspect.signature(experts_cls.__init__).parameters.get("config")
    annotation = None if annotation is None else annotation.annotation
    if isinstance(annotation, str):
        annotation = getattr(module, annotation, None)
    configs = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, transformers.PretrainedConfig) and c is not transformers.PretrainedConfig]
    configs.sort(key=lambda c: -len(os.path.commonprefix([c.__name__, experts_cls.__name__])))
    if inspect.isclass(annotation) and issubclass(annotation, transformers.PretrainedConfig):
        configs.insert(0, annotation)  # first, and its nested configs (some annotate the composite)
    for config_cls in configs:
        for candidate in _nested(config_cls()):
            if _has_expert_count(candidate):
                return candidate
    return None


def _nested(config, depth=2):
    """The config and the configs it holds (text_config, thinker_config, …), breadth first."""
    level = [config]
    for _ in range(depth + 1):
        yield from level
        level = [v for c in level for v in vars(c).values() if isinstance(v, transformers.PretrainedConfig)]


def _set(config, name, value):
    current = getattr(config, name)
    if isinstance(current, (list, tuple)):
        value = type(current)([value] * len(current))
    setattr(config, name, value)


def shrink(config):
    for name in EXPERT_COUNT_FIELDS:
        if hasattr(config, name):
            _set(config, name, NUM_EXPERTS)
    config.hidden_size = HIDDEN
    for name in WIDTH_FIELDS:
        if hasattr(config, name):
            _set(config, name, INTERMEDIATE)
    if hasattr(config, "moe_hidden_size"):
        config.moe_hidden_size = HIDDEN
    if hasattr(config, "moe_latent_size"):
        config.moe_latent_size = None
    return config


def build(model_type, file_stem, class_name):
    """The experts module in fp32 with random weights, or a skip naming why it cannot be built."""
    module = importlib.import_module(f"transformers.models.{model_type}.{file_stem}")
    experts_cls = getattr(module, class_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = _config(module, experts_cls)
            if config is None:
                pytest.skip(f"{class_name}: no config with an expert count found in {file_stem}")
            kwargs = {}
            if "intermediate_size" in inspect.signature(experts_cls.__init__).parameters:
                kwargs["intermediate_size"] = INTERMEDIATE  # where the block passes the width (Ernie-VL)
            experts = experts_cls(shrink(config), **kwargs).float()
    except Exception as exc:  # noqa: BLE001 — an unbuildable config is the one reason to skip
        pytest.skip(f"{class_name} cannot be built from a tiny config: {type(exc).__name__}: {exc}")
    generator = torch.Generator().manual_seed(hash(class_name) % 2**31)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return experts


def input_width(experts):
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return up.shape[1] if experts.is_transposed else up.shape[2]


def run(experts, impl, x, idx, weight):
    experts.config._experts_implementation = impl
    x = x.clone().requires_grad_()
    params = [p for p in experts.parameters() if p.requires_grad]
    out = experts(x, idx, weight)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(), [x, *params])
    return out.detach(), grads


def inputs(experts, seed, top_k=TOP_K):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, input_width(experts), generator=generator)
    idx = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator)[:top_k] for _ in range(TOKENS)])
    idx[0] = idx[1]  # two tokens on one expert, and (T=9, k=2, E=4) some experts with few tokens
    weight = torch.rand(TOKENS, top_k, generator=generator)
    return x, idx, weight


def eager_reference(experts, class_name):
    """(inputs, eager's output and gradients) at top-2, or at top-1 for a class whose eager forward takes
    one route per row with unit weight (transformers 5.25's ErgoExpertProjections: its subclass gives
    each route its own row and weights them after a per-expert norm; its eager forward ignores the
    weights and its mask indexing fails on two routes); a class that fails at both fails the test."""
    try:
        x, idx, weight = inputs(experts, seed=len(class_name))
        return (x, idx, weight), run(experts, "eager", x, idx, weight)
    except (IndexError, RuntimeError) as at_top2:
        x, idx, _ = inputs(experts, seed=len(class_name), top_k=1)
        weight = torch.ones(idx.shape)  # what the class's one caller passes
        try:
            return (x, idx, weight), run(experts, "eager", x, idx, weight)
        except Exception:
            raise at_top2 from None


def test_discovery_finds_the_interface_classes():
    names = {class_name for _, _, class_name in CLASSES}
    assert len(CLASSES) >= 10, CLASSES
    assert "MixtralExperts" in names


@pytest.mark.parametrize("model_type,file_stem,class_name", CLASSES, ids=[c for _, _, c in CLASSES])
def test_fastmoe_equals_eager(model_type, file_stem, class_name):
    experts = build(model_type, file_stem, class_name)
    (x, idx, weight), (ref_out, ref_grads) = eager_reference(experts, class_name)
    out, grads = run(experts, "fastmoe", x, idx, weight)
    torch.testing.assert_close(out, ref_out, **tol(torch.float32))
    names = ["x"] + [n for n, p in experts.named_parameters() if p.requires_grad]
    for name, g, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref, **tol(torch.float32), msg=lambda m: f"{class_name} grad of {name}: {m}")
    if model_type in EXPECTED_GENERIC:
        assert fused_activation(experts) is None, class_name
    expected = EXPECTED_FUSED.get(model_type)
    if expected is not None:
        act = fused_activation(experts)
        assert act is not None and (act.name, act.interleaved) == expected, (class_name, act)
        if act.name in ("swiglu", "swiglu_oai") and model_type not in ("lfm2_moe", "beam", "mixtral"):
            assert math.isfinite(act.limit), act  # the clamp was found, not dropped


BACKEND_CASES = [c for c in CLASSES if c[0] in set(EXPECTED_FUSED) | EXPECTED_GENERIC]


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    from fastmoe_kernels import backends

    ok, why = backends.availability(request.param, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable here: {why}")
    backends.set_default_backend(request.param)
    yield request.param
    backends.set_default_backend(None)


@pytest.mark.parametrize("model_type,file_stem,class_name", BACKEND_CASES, ids=[c for _, _, c in BACKEND_CASES])
def test_fastmoe_equals_eager_on_kernel_backends(kernel_backend, model_type, file_stem, class_name):
    """The fused activations (Triton: in the GEMM epilogue) and the generic path on each kernel backend."""
    test_fastmoe_equals_eager(model_type, file_stem, class_name)


def test_generic_path_is_logged_once_per_class(caplog):
    cases = [c for c in CLASSES if c[0] == "inkling2"] or pytest.skip("inkling2 is not in this transformers")
    experts = [build(*cases[0]) for _ in range(2)]
    x, idx, weight = inputs(experts[0], seed=0)
    from fastmoe_kernels import hf_gate

    hf_gate._LOGGED.discard(type(experts[0]).__name__)
    with caplog.at_level("WARNING", logger="fastmoe_kernels"):
        for module in experts:
            run(module, "fastmoe", x, idx, weight)
    messages = [r.getMessage() for r in caplog.records if "generic" in r.getMessage() or "slower" in r.getMessage()]
    assert len(messages) == 1 and type(experts[0]).__name__ in messages[0], messages


@pytest.mark.parametrize("model_type", ["gpt_oss", "inkling2", "muse_spark"])
def test_compiled_fullgraph(model_type):
    """The probe runs outside the trace: a compiled model sees a constant, no graph break."""
    cases = [c for c in CLASSES if c[0] == model_type] or pytest.skip(f"{model_type} is not in this transformers")
    experts = build(*cases[0])
    x, idx, weight = inputs(experts, seed=1)
    eager, _ = run(experts, "eager", x, idx, weight)
    experts.config._experts_implementation = "fastmoe"
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx, weight), eager, **tol(torch.float32))
