"""Optional enhancer backend: GFPGAN ``.pth`` checkpoints through PyTorch.

For users who have ``GFPGANv1.4.pth`` rather than an ONNX export. It builds the network
the way ``gfpgan.GFPGANer`` does for ``arch='clean'`` (GFPGANv1Clean, 512, channel
multiplier 2) and loads ``params_ema`` from the checkpoint, but runs it directly on the
already aligned crops: GFPGANer's own face helper would detect and align faces again and
fetch a RetinaFace model to do it, work the detector stage has already done.

Pre- and post-processing are those of the ONNX enhancer (:mod:`services.enhancer.model`),
so both backends give the same interface: ``enhance(crops, fidelity_weight)``.

Needs ``torch`` and ``gfpgan`` (which pulls in torchvision, basicsr and facexlib):
``pip install 'facestage[torch]'``. Importing this module without them raises ImportError
saying so. The packages are imported through importlib so that type-checking facestage
does not require them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from facestage.errors import ModelFileError
from facestage.types import AlignmentTemplateName
from services.enhancer.model import (
    DEFAULT_FIDELITY_WEIGHT,
    ENHANCER_TEMPLATE,
    normalize_enhancer_output,
    prepare_enhancer_input,
    validate_enhancer_request,
)

INSTALL_HINT = "pip install 'facestage[torch]'"


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the PyTorch GFPGAN backend needs {module!r}, which is not importable ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc


torch = _require("torch")
_gfpgan_arch = _require("gfpgan.archs.gfpganv1_clean_arch")

GFPGAN_CROP_SIZE_PX = 512


class TorchGfpganEnhancer:
    """GFPGAN (v1.3 / v1.4 clean architecture) from a ``.pth`` checkpoint.

    ``enhance`` takes (N,512,512,3) uint8 BGR crops aligned to ffhq_512 and returns the
    same shape; the whole batch goes through the network in one forward pass.
    """

    def __init__(self, checkpoint: Path, device: str | None = None) -> None:
        if not checkpoint.is_file():
            raise ModelFileError(str(checkpoint), "not found")
        self.device: Any = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # The arguments GFPGANer passes for arch='clean', channel_multiplier=2.
        network = _gfpgan_arch.GFPGANv1Clean(
            out_size=GFPGAN_CROP_SIZE_PX,
            num_style_feat=512,
            channel_multiplier=2,
            decoder_load_path=None,
            fix_decoder=False,
            num_mlp=8,
            input_is_latent=True,
            different_w=True,
            narrow=1,
            sft_half=True,
        )
        try:
            # weights_only: a checkpoint is a dict of tensors; never unpickle code from it.
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
            params = state["params_ema"] if "params_ema" in state else state["params"]
            network.load_state_dict(params, strict=True)
        except Exception as exc:  # torch raises assorted types for foreign or corrupt files
            raise ModelFileError(str(checkpoint), f"not a GFPGAN checkpoint ({exc})") from exc
        self.network: Any = network.eval().to(self.device)
        self.path = checkpoint

    @property
    def crop_size_px(self) -> int:
        """Side of the square crop GFPGAN takes (512)."""
        return GFPGAN_CROP_SIZE_PX

    @property
    def template(self) -> AlignmentTemplateName:
        """The alignment template crops must be warped to."""
        return ENHANCER_TEMPLATE

    @property
    def has_fidelity_weight(self) -> bool:
        """GFPGAN has no fidelity weight (GFPGANv1Clean ignores the ``weight`` argument)."""
        return False

    def enhance(
        self, crops: np.ndarray, fidelity_weight: float = DEFAULT_FIDELITY_WEIGHT
    ) -> np.ndarray:
        """(N,512,512,3) uint8 BGR aligned crops -> the same shape, restored, in order."""
        validate_enhancer_request(crops, fidelity_weight, self.crop_size_px)
        with torch.no_grad():
            batch = torch.from_numpy(prepare_enhancer_input(crops)).to(self.device)
            output = self.network(batch, return_rgb=False)[0]
            restored = output.float().cpu().numpy()
        return normalize_enhancer_output(restored)
