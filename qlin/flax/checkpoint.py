"""Save and load quantized Flax models as safetensors files, 8-bit arrays bit for bit.

Why safetensors: one flat file of raw little-endian buffers with a JSON header,
readable by torch/vLLM (fp8 tensors are stored with the standard ``F8_E4M3`` /
``F8_E5M2`` dtypes, int8 as ``I8``), no pickling, and no float copy on the way in
or out. Keys are module paths joined by "/" plus the variable name
(``blocks/0/mlp/up/weight``, ``.../weight_scale``); the header's metadata records
which layers are quantized and with which config, so loading needs only the float
model's definition:

>>> save_nnx("model.safetensors", qmodel)
>>> skeleton = nnx.eval_shape(lambda: Model(rngs=nnx.Rngs(0)))     # no float weights allocated
>>> qmodel = load_nnx("model.safetensors", skeleton)

Checkpoints store the *logical* params (qlin's canonical, unpadded layout, the same
keys and shapes as a vLLM/torch state dict), never a kernel's processed layout: a
layer processed for ``mosaic_gpu`` (weight padded to ``(N_pad, K_pad)``) is unpadded on
save, and loading processes the params once for the kernel of the loading machine.
So a file saved on an H100 loads on a CPU and back, and save -> load -> save is
bit-exact.

Writing uses ``safetensors.numpy``; reading parses the buffers with
``safetensors.deserialize`` and ml_dtypes (safetensors' numpy loader has no fp8/bf16 types).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.errors import ConfigError, InputError, ParamsError

FORMAT = "qlin.flax"
FORMAT_VERSION = "1"
_CONFIG_CLASSES = {c.__name__: c for c in (FP8ScaledMMConfig, Int8ScaledMMConfig)}


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qlin.flax.checkpoint needs safetensors: pip install 'safetensors>=0.4'") from e
    return safetensors


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
        "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
        "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
        "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8),
        "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
        "BOOL": np.dtype(np.bool_),
    }


# -- configs <-> JSON ------------------------------------------------------------------------

def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able description of a built-in qlin config (inverse: :func:`config_from_dict`)."""
    if type(config).__name__ not in _CONFIG_CLASSES:
        raise ConfigError(f"config: only {sorted(_CONFIG_CLASSES)} can be saved, got {type(config).__name__}")
    d: dict[str, Any] = {"class": type(config).__name__}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, np.dtype):
            v = v.name
        elif isinstance(v, tuple):
            v = list(v)
        d[f.name] = v
    return d


def config_from_dict(d: dict[str, Any]):
    d = dict(d)
    cls = _CONFIG_CLASSES.get(d.pop("class", None))
    if cls is None:
        raise ConfigError(f"checkpoint: unknown config class in {d!r}")
    if isinstance(d.get("weight_granularity"), list):
        d["weight_granularity"] = tuple(d["weight_granularity"])
    return cls(**d)


# -- raw file I/O -------------------------------------------------------------------------------

def save_arrays(path, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``{key: array}`` (any dtype jax has, fp8 included) to a safetensors file."""
    st = _safetensors()
    out = {}
    for key, a in arrays.items():
        a = np.asarray(jax.device_get(a))
        if a.dtype.kind not in "fiub" and a.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raise InputError(f"{key}: cannot save an array of dtype {a.dtype}")
        out[key] = np.array(a, order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)
    st.numpy.save_file(out, str(path), metadata=metadata)


def load_arrays(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({key: numpy array}, metadata)`` of a safetensors file, dtypes exactly as stored."""
    st = _safetensors()
    data = Path(path).read_bytes()
    table = _dtypes()
    arrays = {}
    for key, info in st.deserialize(data):
        dt = table.get(info["dtype"])
        if dt is None:
            raise InputError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        arrays[key] = np.frombuffer(bytes(info["data"]), dtype=dt).reshape(info["shape"])
    with st.safe_open(str(path), "numpy") as f:
        meta = f.metadata() or {}
    return arrays, meta


def _check_meta(meta: dict[str, str], kind: str, path) -> list[dict[str, Any]]:
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a qlin.flax checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("kind") != kind:
        raise InputError(f"{path}: saved from a {meta.get('kind')} model; use load_{meta.get('kind')}")
    return json.loads(meta.get("layers", "[]"))


def _key(path) -> str:
    return "/".join(str(p) for p in path)


# -- nnx ---------------------------------------------------------------------------------------

def _saved_state(model):
    from flax import nnx

    return [(p, v) for p, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v, nnx.RngState)]


def save_nnx(path, model) -> None:
    """Save every variable of an nnx model (RNG state excepted) plus its QLinear layers' configs.

    QLinear layers are saved unpadded (:meth:`~qlin.flax.QLinear.logical_arrays`).
    """
    from flax import nnx

    from qlin.flax.nnx import QLinear

    qlinears = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, QLinear)]
    layers = [{"path": _key(p), "config": config_to_dict(m.config), "kernel": m.kernel_name} for p, m in qlinears]
    arrays = {_key(p): v.get_value() for p, v in _saved_state(model)}
    for p, m in qlinears:
        prefix = f"{_key(p)}/" if p else ""
        for name, a in m.logical_arrays().items():
            if prefix + name in arrays:
                arrays[prefix + name] = a
    save_arrays(path, arrays, {"format": FORMAT, "version": FORMAT_VERSION, "kind": "nnx",
                               "layers": json.dumps(layers)})


def load_nnx(path, model):
    """Load a :func:`save_nnx` file into ``model`` (in place) and return it.

    ``model`` is the float model's definition, ideally abstract
    (``nnx.eval_shape(lambda: Model(...))``, nothing allocated): the layers the
    file says are quantized are replaced by :class:`~qlin.flax.QLinear` shells,
    then every variable gets the stored array (exact dtype and bits). Shapes and
    dtypes must match the definition; missing or extra entries are errors. Finally
    each QLinear is processed once for this machine's kernel (:meth:`QLinear.process`).
    """
    from flax import nnx

    from qlin.flax.convert import _get, _set_child
    from qlin.flax.nnx import QLinear

    arrays, meta = load_arrays(path)
    layers = _check_meta(meta, "nnx", path)
    paths = {_key(p): tuple(p) for p, _ in nnx.iter_modules(model)}
    for entry in layers:
        lp = entry["path"]
        if lp not in paths:
            raise InputError(f"{path}: quantized layer {lp!r} does not exist in the model")
        key_path = paths[lp]
        old = _get(model, key_path)
        config = config_from_dict(entry["config"])
        w = arrays.get(f"{lp}/weight")
        if w is None:
            raise InputError(f"{path}: no '{lp}/weight' for quantized layer {lp!r}")
        *stack, n, k = w.shape
        if isinstance(old, nnx.Linear):
            if (old.in_features, old.out_features) != (k, n):
                raise ParamsError(f"{lp}: the model's Linear is {old.in_features} -> {old.out_features}, "
                                  f"the checkpoint's weight is {k} -> {n} (shape {w.shape})")
        elif not isinstance(old, QLinear):
            raise InputError(f"{lp}: expected an nnx.Linear (or QLinear) there, found {type(old).__name__}")
        bias = arrays.get(f"{lp}/bias")
        shell = nnx.eval_shape(lambda: QLinear(
            k, n, config=config, use_bias=bias is not None, kernel=entry.get("kernel"), stack_shape=tuple(stack),
            param_dtype=bias.dtype if bias is not None else jnp.float32,
            input_scale_ub=f"{lp}/input_scale_ub" in arrays))
        if key_path:
            _set_child(_get(model, key_path[:-1]), key_path[-1], shell)
        else:
            raise InputError("load_nnx: the model itself is a quantized layer; load into a containing module")
    new, seen = [], set()
    for p, v in _saved_state(model):
        key = _key(p)
        if key not in arrays:
            raise InputError(f"{path}: no entry {key!r}, which the model has")
        a = arrays[key]
        want = v.get_value()
        if tuple(a.shape) != tuple(np.shape(want)) or jnp.dtype(a.dtype) != jnp.result_type(want):
            raise ParamsError(f"{key}: checkpoint has {a.dtype} {tuple(a.shape)}, the model expects "
                              f"{jnp.result_type(want)} {tuple(np.shape(want))}")
        new.append((p, v.replace(jnp.asarray(a))))
        seen.add(key)
    extra = sorted(set(arrays) - seen)
    if extra:
        raise InputError(f"{path}: entries {extra[:10]} have no variable in the model")
    nnx.update(model, nnx.from_flat_state(new))
    for _, m in nnx.iter_modules(model):
        if isinstance(m, QLinear):
            m.process(strict=False)
    return model


# -- linen -------------------------------------------------------------------------------------

def _flatten(tree, prefix=()):
    if hasattr(tree, "items"):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {_key(prefix): tree}


def save_linen(path, variables, quantized=None) -> None:
    """Save a linen variables tree; ``quantized`` (a :class:`~qlin.flax.QuantizedLinen`) records the configs.

    With ``quantized`` the converted layers are saved unpadded (``quantized.logical``);
    without it the tree is saved as it is.
    """
    layers = []
    if quantized is not None:
        layers = [{"path": p, "config": config_to_dict(c), "kernel": k} for p, c, k in quantized.layers]
        variables = quantized.logical(variables)
    save_arrays(path, _flatten(variables), {"format": FORMAT, "version": FORMAT_VERSION, "kind": "linen",
                                            "layers": json.dumps(layers)})


def load_linen(path, model=None):
    """``(QuantizedLinen or the layer list, variables)`` from a :func:`save_linen` file.

    With ``model`` (the float linen model) the first item is the ready
    :class:`~qlin.flax.QuantizedLinen`; otherwise a list of ``(path, config, kernel)``.
    Either way the quantized layers' variables come back processed for this
    machine's kernels (:meth:`QuantizedLinen.process`).
    """
    from qlin.flax.linen import QuantizedLinen

    arrays, meta = load_arrays(path)
    layers = tuple((e["path"], config_from_dict(e["config"]), e.get("kernel")) for e in _check_meta(meta, "linen", path))
    tree: dict[str, Any] = {}
    for key, a in arrays.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(a)
    dims = []
    for p, _, _ in layers:
        w = arrays.get(f"params/{p}/weight" if p else "params/weight")
        if w is None:
            raise InputError(f"{path}: no 'params/{p}/weight' for quantized layer {p!r}")
        dims.append((p, int(w.shape[-2]), int(w.shape[-1])))
    qm = QuantizedLinen(model, layers, tuple(dims))
    if layers:
        tree = _process_linen(qm, tree)
    return (qm if model is not None else list(layers)), tree


def _process_linen(qm, tree):
    from qlin.api import kernel_for
    from qlin.errors import NoKernelError

    try:
        for _, config, kernel in qm.layers:
            kernel_for(config, override=kernel)
    except NoKernelError:
        return tree  # a call raises the selection error, as for an unprocessed tree
    return qm.process(tree)
