"""The Transformer Engine layer spec and the FP8 options.

Without Transformer Engine (this CPU box, CI) the TE spec cannot be instantiated; what can be
checked is checked from the spec definitions: the two specs have the same tree, differ only in
the linear classes, and the TE linears accept exactly the constructor arguments our multiway
factory passes (so they are built with the same in/out sizes and parallel modes, hence the same
parameter names and shapes). With TE and a GPU, both models are built and their state dicts
compared directly.
"""

import inspect

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_m2.config import ConfigError
from megatron_m2.model import layer_specs
from megatron_m2.model.layer_specs import (
    HAVE_TE,
    get_m2_block_spec,
    get_m2_layer_local_spec,
    get_m2_layer_te_spec,
)
from megatron_m2.training.arguments import fp8_options, parse_args
from megatron_m2.training.validation import validate_args

LINEARS = {"linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1", "linear_fc2"}


def _walk(spec, path=""):
    """(path, value) for every leaf of a ModuleSpec tree (modules, params, submodule fields)."""
    if isinstance(spec, ModuleSpec):
        yield path + ".module", spec.module
        yield path + ".params", spec.params
        if spec.submodules is not None:
            yield from _walk(spec.submodules, path)
    elif hasattr(spec, "__dataclass_fields__"):
        for name in spec.__dataclass_fields__:
            yield from _walk(getattr(spec, name), f"{path}.{name}")
    else:
        yield path, spec


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed")
def test_te_spec_without_te_is_a_clear_error():
    with pytest.raises(RuntimeError, match="transformer_engine is not installed"):
        get_m2_layer_te_spec()
    with pytest.raises(RuntimeError, match="--transformer-impl local"):
        get_m2_block_spec(3, 3, 0, 6, impl="te")


@pytest.mark.parametrize("shared, entry", [(False, False), (True, True), (True, False)])
def test_te_and_local_specs_differ_only_in_linears(shared, entry):
    local = dict(_walk(get_m2_layer_local_spec(shared, entry)))
    te = dict(_walk(get_m2_layer_te_spec(shared, entry, require_te=False)))
    assert local.keys() == te.keys()
    differing = {k for k in local if local[k] is not te[k] and local[k] != te[k]}
    assert differing and all(k.rsplit(".", 1)[-1] in LINEARS for k in differing), differing
    from megatron.core.extensions import transformer_engine as te_ext

    for k in differing:  # (without TE installed these megatron classes are placeholders)
        assert te[k] is getattr(te_ext, "TE" + local[k].__name__), (k, te[k], local[k])


def _factory_kwargs(parallel_mode):
    """The keyword arguments multiway_linear hands a branch's linear class."""
    captured = {}

    def fake_build(spec, *args, **kwargs):
        captured.update(args=args, kwargs=kwargs)
        return torch.nn.Identity()

    from megatron_m2.model import attention
    from megatron_m2.model.multiway import MultiwayState, PackedLayout

    saved = attention.build_module
    attention.build_module = fake_build
    try:
        cfg = type("C", (), {"vision_seq_len": 3})()
        attention.multiway_linear(None, cfg, 64, 128, parallel_mode, None, shared=False,
                                  state=MultiwayState(PackedLayout.both(3)))
    finally:
        attention.build_module = saved
    return captured["args"], captured["kwargs"]


def _init_params(module_file, cls_name):
    """(positional parameter names, {keyword-only name: has default}) of ``cls.__init__``,
    read from the source: without TE installed megatron replaces the TE classes by
    placeholders, but their definitions are still there to check against."""
    import ast

    tree = ast.parse(open(module_file).read())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    a = init.args
    positional = [x.arg for x in a.args[1:]]
    kwonly = {x.arg: d is not None for x, d in zip(a.kwonlyargs, a.kw_defaults)}
    return positional, kwonly


@pytest.mark.parametrize("parallel_mode, cls_name", [("column", "TEColumnParallelLinear"),
                                                     ("row", "TERowParallelLinear")])
def test_te_linears_accept_the_factory_arguments(parallel_mode, cls_name):
    from megatron.core import tensor_parallel
    from megatron.core.extensions import transformer_engine as te_ext

    args, kwargs = _factory_kwargs(parallel_mode)
    assert args == (64, 128) and kwargs["bias"] is True and kwargs["skip_bias_add"] is False
    positional, kwonly = _init_params(te_ext.__file__, cls_name)
    # The TE constructor takes (input_size, output_size) and every keyword we pass, and we pass
    # every keyword it requires: the same call builds a TE or a local linear of the same shape.
    assert positional[:2] == ["input_size", "output_size"] and len(args) == 2
    assert set(kwargs) <= set(kwonly) | set(positional), set(kwargs) - set(kwonly)
    assert {k for k, has_default in kwonly.items() if not has_default} <= set(kwargs)
    local_cls = getattr(tensor_parallel, cls_name[2:])
    inspect.signature(local_cls.__init__).bind(None, *args, **kwargs)


@pytest.mark.skipif(not (HAVE_TE and torch.cuda.is_available()),
                    reason="needs Transformer Engine and a GPU")
def test_te_and_local_models_have_the_same_parameters(dist_world_of_one):  # pragma: no cover
    from megatron_m2.model import build_model
    from tests.model.common import TINY

    def params(impl):
        m = build_model(TINY, 1, 1, transformer_impl=impl)
        return {k: tuple(v.shape) for k, v in m.state_dict().items()
                if not k.endswith("_extra_state")}

    assert params("te") == params("local")


# -- FP8 options -------------------------------------------------------------------------------
BASE = ["--flavor", "0.4b", "--synthetic", "--global-batch-size", "64", "--micro-batch-size",
        "16"]
FP8 = ["--bf16", "--transformer-impl", "te", "--fp8-format", "hybrid"]


def _validate(flags, monkeypatch, te=True):
    from megatron_m2.training import validation

    monkeypatch.setattr(validation, "have_transformer_engine", lambda: te)
    args = parse_args(BASE + flags)
    validate_args(args, 4)
    return args


def test_fp8_needs_transformer_engine(monkeypatch):
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        _validate(FP8, monkeypatch, te=False)


@pytest.mark.parametrize("flags, message", [
    (["--bf16", "--fp8-format", "hybrid"], "--transformer-impl te"),
    (["--transformer-impl", "te", "--fp8-format", "e4m3"], "needs --bf16"),
    (FP8 + ["--micro-batch-size", "3", "--global-batch-size", "12"], "multiple of 16"),
    (FP8 + ["--micro-batch-size", "16", "--fp8-recipe", "mxfp8"], "multiple of 32"),
])
def test_fp8_misconfigurations(flags, message, monkeypatch):
    with pytest.raises(ConfigError, match=message):
        _validate(flags, monkeypatch)


def test_fp8_options_reach_the_transformer_config(monkeypatch):
    args = _validate(FP8 + ["--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "16"],
                     monkeypatch)
    opts = fp8_options(args)
    assert opts == {"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_margin": 0,
                    "fp8_amax_history_len": 16, "fp8_amax_compute_algo": "most_recent"}
    from megatron_m2.flavors import get_flavor
    from megatron_m2.model.transformer_config import to_transformer_config

    config = to_transformer_config(get_flavor("0.4b"), bf16=True, **opts)
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len) == (
        "hybrid", "tensorwise", 16)
    assert fp8_options(parse_args(BASE)) == {}


def test_block_spec_te_path_uses_the_te_layer(monkeypatch):
    monkeypatch.setattr(layer_specs, "HAVE_TE", True)
    block = get_m2_block_spec(3, 3, 0, 6, impl="te")
    from megatron.core.extensions import transformer_engine as te_ext

    classes = [s.submodules.self_attention.submodules.linear_q for s in block.layer_specs]
    assert len(classes) == 6 and all(c is te_ext.TEColumnParallelLinear for c in classes)
