"""Contract fixtures: small ONNX graphs with the exact interface of the production models.

The production models (ArcFace w600k_r50, inswapper_128, GFPGAN 1.4, CodeFormer) are
hundreds of megabytes and cannot be fetched on build machines. These fixtures copy their
input and output names, shapes and dtypes (and inswapper's ``emap`` initializer, the last
one of the graph, where InsightFace reads it) around a tiny deterministic computation, so
every stage's plumbing (pre-processing, batching, post-processing, gRPC) can be tested
end to end.

A fixture is for the plumbing only. Its outputs depend on its inputs, and that is all:
the inswapper fixture's output is NOT a face swap, the GFPGAN fixture does not restore
anything, and the ArcFace fixture's vectors are random projections of pooled pixels, not
identities. Never describe a fixture's output as a swap or an enhancement.

Files written by :func:`write_contract_fixtures` (names are stable; tests and docs use them):

==============================  ==========================================================
``arcface_w600k_r50_fixture``   ``input.1`` [None,3,112,112] f32 -> ``683`` [None,512] f32
``inswapper_128_fixture``       ``target`` [1,3,128,128] f32, ``source`` [1,512] f32 ->
                                ``output`` [1,3,128,128] f32 in (0,1); ``emap`` 512x512 last
``gfpgan_1.4_fixture``          ``input`` [1,3,512,512] f32 -> ``output`` [1,3,512,512] in (-1,1)
``codeformer_fixture``          ``input`` [1,3,512,512] f32, ``weight`` [1] f64 ->
                                ``output`` [1,3,512,512] f32 in (-1,1)
==============================  ==========================================================

Only the ``onnx`` package is needed (``pip install 'facestage[fixtures]'``); it is imported
lazily so the rest of facestage never depends on it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ARCFACE_FIXTURE_FILE = "arcface_w600k_r50_fixture.onnx"
INSWAPPER_FIXTURE_FILE = "inswapper_128_fixture.onnx"
GFPGAN_FIXTURE_FILE = "gfpgan_1.4_fixture.onnx"
CODEFORMER_FIXTURE_FILE = "codeformer_fixture.onnx"

# Opset 17 and IR version 8 load in every ONNX Runtime facestage supports (>= 1.19);
# pinning them also keeps the bytes identical whatever onnx version writes the file.
OPSET = 17
IR_VERSION = 8

# The dim_param InsightFace's ArcFace export carries on its batch axis.
DYNAMIC_BATCH = "None"

_SEEDS = {"arcface": 112, "inswapper": 128, "gfpgan": 512, "codeformer": 513}


def _onnx() -> ModuleType:
    """Imports ``onnx`` or says how to get it."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is in the dev environment
        raise ImportError(
            "contract fixtures need the onnx package: pip install 'facestage[fixtures]'"
        ) from exc
    return onnx


def _model(graph: Any, onnx: ModuleType) -> Any:
    """Wraps a graph in a model with the pinned opset and IR version, checked."""
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="facestage.fixtures",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _tensor(onnx: ModuleType, name: str, array: np.ndarray[Any, Any]) -> Any:
    return onnx.numpy_helper.from_array(array, name=name)


def _smoothing_conv(rng: np.random.Generator, gain: float, noise: float) -> np.ndarray[Any, Any]:
    """A 3x3 conv kernel, [3,3,3,3]: ``gain`` times identity at the centre tap plus noise.

    Close to identity so the output still looks like the input (useful when a test eyes
    the pixels), with enough noise that channels and neighbours mix.
    """
    kernel = rng.normal(0.0, noise, size=(3, 3, 3, 3)).astype(np.float32)
    for channel in range(3):
        kernel[channel, channel, 1, 1] += gain
    return kernel


def build_arcface_fixture() -> Any:
    """ArcFace w600k_r50's interface: ``input.1`` [None,3,112,112] -> ``683`` [None,512].

    Computation: 8x8 average pooling to 3x14x14, flatten to 588, times a fixed random
    588x512 matrix. Different faces give different vectors; a shifted or rescaled copy of
    the same aligned crop gives a close one. The vectors are not identities.
    """
    onnx = _onnx()
    helper, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(_SEEDS["arcface"])
    projection = (rng.normal(0.0, 1.0, size=(588, 512)) / np.sqrt(588)).astype(np.float32)
    nodes = [
        helper.make_node(
            "AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_w600k_r50_fixture",
        [helper.make_tensor_value_info("input.1", tp.FLOAT, [DYNAMIC_BATCH, 3, 112, 112])],
        [helper.make_tensor_value_info("683", tp.FLOAT, [DYNAMIC_BATCH, 512])],
        initializer=[_tensor(onnx, "projection", projection)],
    )
    return _model(graph, onnx)


def build_inswapper_fixture(embedding_size: int = 512) -> Any:
    """inswapper_128's interface: ``target`` [1,3,128,128] and ``source`` [1,512] ->
    ``output`` [1,3,128,128], with a 512x512 ``emap`` as the graph's last initializer.

    ``embedding_size`` other than 512 makes a variant for another recogniser (a 128-d
    one lets tests pair the swap plumbing with the real MobileFaceNet); the production
    contract is 512.

    Computation: Sigmoid(conv(target) + a per-channel term and a per-pixel term, both
    linear in ``source``). Different source latents therefore give clearly different
    outputs, and the output stays in (0, 1) as the real model's does. This is NOT a face
    swap. ``emap`` is a fixed random matrix scaled so a unit vector keeps about unit norm;
    like in the real file no node reads it (the caller applies it to the embedding).
    """
    onnx = _onnx()
    helper, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(_SEEDS["inswapper"])
    conv_w = _smoothing_conv(rng, gain=4.0, noise=0.1)
    conv_b = np.full(3, -2.0, dtype=np.float32)  # 4t - 2 keeps Sigmoid away from saturation
    size = embedding_size
    channel_w = rng.normal(0.0, 1.0, size=(size, 3)).astype(np.float32)
    pixel_w = rng.normal(0.0, 1.0, size=(size, 16 * 16)).astype(np.float32)
    emap = (rng.normal(0.0, 1.0, size=(size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["target", "mix_w", "mix_b"], ["mixed"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["source", "channel_w"], ["channel_flat"]),
        helper.make_node("Reshape", ["channel_flat", "channel_shape"], ["channel_term"]),
        helper.make_node("MatMul", ["source", "pixel_w"], ["pixel_flat"]),
        helper.make_node("Reshape", ["pixel_flat", "pixel_shape"], ["pixel_coarse"]),
        helper.make_node(
            "Resize", ["pixel_coarse", "", "pixel_scales"], ["pixel_term"], mode="nearest"
        ),
        helper.make_node("Add", ["mixed", "channel_term"], ["with_channel"]),
        helper.make_node("Add", ["with_channel", "pixel_term"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    initializers = [
        _tensor(onnx, "mix_w", conv_w),
        _tensor(onnx, "mix_b", conv_b),
        _tensor(onnx, "channel_w", channel_w),
        _tensor(onnx, "channel_shape", np.array([1, 3, 1, 1], dtype=np.int64)),
        _tensor(onnx, "pixel_w", pixel_w),
        _tensor(onnx, "pixel_shape", np.array([1, 1, 16, 16], dtype=np.int64)),
        _tensor(onnx, "pixel_scales", np.array([1.0, 1.0, 8.0, 8.0], dtype=np.float32)),
        # Last on purpose: InsightFace and FaceFusion read graph.initializer[-1].
        _tensor(onnx, "emap", emap),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_128_fixture",
        [
            helper.make_tensor_value_info("target", tp.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", tp.FLOAT, [1, size]),
        ],
        [helper.make_tensor_value_info("output", tp.FLOAT, [1, 3, 128, 128])],
        initializer=initializers,
    )
    return _model(graph, onnx)


def build_gfpgan_fixture() -> Any:
    """GFPGAN 1.4's interface (FaceFusion export): ``input`` [1,3,512,512] -> ``output``
    [1,3,512,512] in (-1, 1).

    Computation: Tanh of a near-identity 3x3 conv. It restores nothing; it only has the
    shapes, the batch axis fixed at 1 and the output range of the real model.
    """
    onnx = _onnx()
    helper, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(_SEEDS["gfpgan"])
    conv_w = _smoothing_conv(rng, gain=1.0, noise=0.05)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["conv"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gfpgan_1.4_fixture",
        [helper.make_tensor_value_info("input", tp.FLOAT, [1, 3, 512, 512])],
        [helper.make_tensor_value_info("output", tp.FLOAT, [1, 3, 512, 512])],
        initializer=[_tensor(onnx, "conv_w", conv_w)],
    )
    return _model(graph, onnx)


def build_codeformer_fixture() -> Any:
    """CodeFormer's interface (FaceFusion export): ``input`` [1,3,512,512] float32 and
    ``weight`` [1] float64 (FaceFusion feeds ``numpy.array([w]).astype(numpy.double)``)
    -> ``output`` [1,3,512,512] in (-1, 1).

    Computation: Tanh(w * input + (1 - w) * conv(input)), so like CodeFormer's fidelity
    weight, w = 1 stays closest to the input and changing w changes the output. It
    restores nothing.
    """
    onnx = _onnx()
    helper, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(_SEEDS["codeformer"])
    conv_w = _smoothing_conv(rng, gain=0.5, noise=0.2)
    nodes = [
        helper.make_node("Cast", ["weight"], ["weight_f32"], to=tp.FLOAT),
        helper.make_node("Reshape", ["weight_f32", "weight_shape"], ["w"]),
        helper.make_node("Sub", ["one", "w"], ["one_minus_w"]),
        helper.make_node("Conv", ["input", "conv_w"], ["restored"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["input", "w"], ["kept"]),
        helper.make_node("Mul", ["restored", "one_minus_w"], ["changed"]),
        helper.make_node("Add", ["kept", "changed"], ["blend"]),
        helper.make_node("Tanh", ["blend"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "codeformer_fixture",
        [
            helper.make_tensor_value_info("input", tp.FLOAT, [1, 3, 512, 512]),
            helper.make_tensor_value_info("weight", tp.DOUBLE, [1]),
        ],
        [helper.make_tensor_value_info("output", tp.FLOAT, [1, 3, 512, 512])],
        initializer=[
            _tensor(onnx, "conv_w", conv_w),
            _tensor(onnx, "weight_shape", np.array([1, 1, 1, 1], dtype=np.int64)),
            _tensor(onnx, "one", np.array(1.0, dtype=np.float32)),
        ],
    )
    return _model(graph, onnx)


def write_contract_fixtures(out_dir: Path) -> dict[str, Path]:
    """Writes the four contract fixtures into ``out_dir`` (created if needed).

    Returns their paths keyed by ``arcface``, ``inswapper``, ``gfpgan`` and
    ``codeformer``. The files are byte-identical from run to run.
    """
    onnx = _onnx()
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {
        "arcface": (ARCFACE_FIXTURE_FILE, build_arcface_fixture),
        "inswapper": (INSWAPPER_FIXTURE_FILE, build_inswapper_fixture),
        "gfpgan": (GFPGAN_FIXTURE_FILE, build_gfpgan_fixture),
        "codeformer": (CODEFORMER_FIXTURE_FILE, build_codeformer_fixture),
    }
    written: dict[str, Path] = {}
    for key, (file_name, build) in builders.items():
        path = out_dir / file_name
        onnx.save_model(build(), str(path))
        written[key] = path
    return written
