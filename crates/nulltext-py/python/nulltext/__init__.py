"""nulltext: edit real photos with text, using Stable Diffusion — without PyTorch.

Invert a photo once (null-text inversion, direct inversion, or plain DDIM inversion), then
edit it as often as you like by changing its caption (Prompt-to-Prompt)::

    import nulltext
    sd = nulltext.load("runwayml/stable-diffusion-v1-5")
    inv = sd.invert("cat.jpg", "a cat sitting on a table")
    inv.save("cat.nti.safetensors")
    res = sd.edit(inv, ["a tiger sitting on a table"], blend=("cat", "tiger"))
    res.images[1].save("tiger.png")

The computation is nulltext's Rust library: the same code, the same numbers and the same
error messages as the ``nulltext`` command. Long calls release the GIL, report progress to
an optional callback and stop cleanly on Ctrl-C (``KeyboardInterrupt``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from . import _native
from ._native import ModelError

__all__ = [
    "METHODS",
    "EditResult",
    "Inversion",
    "Model",
    "ModelError",
    "Token",
    "eval",
    "load",
    "tokens",
]

#: The inversion methods ``Model.invert`` accepts.
METHODS: Tuple[str, ...] = tuple(_native.METHODS)

#: A photo: a file path, a PIL image, or an H×W×3 ``uint8`` numpy array.
ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
#: Called with one dict per progress event: ``{"event": "start" | "advance" | "iteration" |
#: "step_done" | "finish", "stage": ..., "total"/"done"/"step"/"iteration"/"loss": ...}``.
ProgressCallback = Callable[[Dict[str, Any]], None]


def _rgb(image: ImageLike, what: str) -> Union[str, Tuple[bytes, int, int]]:
    """A path (read by nulltext itself) or (bytes, width, height) of RGB pixels."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"{what}: an image array must be H×W×3 uint8, got {image.shape} {image.dtype}"
            )
        h, w, _ = image.shape
        return (np.ascontiguousarray(image).tobytes(), w, h)
    raise TypeError(f"{what}: expected a path, a PIL image or a numpy array, got {type(image)}")


def _mask(mask: ImageLike) -> Union[str, Tuple[bytes, int, int]]:
    """A mask as an image: H×W arrays (uint8, or bool with True = counted) become gray RGB."""
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        if mask.dtype == np.bool_:
            mask = mask.astype(np.uint8) * 255
        mask = np.repeat(mask[:, :, None], 3, axis=2)
    elif isinstance(mask, Image.Image):
        mask = mask.convert("L").convert("RGB")
    return _rgb(mask, "mask")


def _array(t: Tuple[bytes, List[int]]) -> np.ndarray:
    data, shape = t
    return np.frombuffer(data, dtype="<f4").reshape(shape).copy()


def _maybe_array(t: Optional[Tuple[bytes, List[int]]]) -> Optional[np.ndarray]:
    return None if t is None else _array(t)


def _pil(p: Tuple[bytes, int, int]) -> Image.Image:
    data, w, h = p
    return Image.frombytes("RGB", (w, h), data)


def _window(v: Union[float, Tuple[float, float], str], what: str) -> str:
    """0.8 → "0.8"; (0.1, 0.8) → "0.1:0.8"; strings pass as the command line's syntax."""
    if isinstance(v, str):
        return v
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what}: a window is (start, end), got {v!r}")
        return f"{float(v[0])!r}:{float(v[1])!r}"
    return repr(float(v))


def _words(v: Union[str, Sequence[str]]) -> str:
    return v if isinstance(v, str) else " ".join(v)


class Inversion:
    """An inverted photo: z_T, the per-step unconditional embeddings (optimized for
    null-text inversion), direct inversion's offsets, and how it was made.

    Save it with :meth:`save` and read it with :meth:`Inversion.load`; the file is
    nulltext's inversion file (safetensors), which ``safetensors.numpy.load_file`` reads too.
    """

    def __init__(self, native: "_native.Inversion"):
        self._native = native

    @staticmethod
    def load(path: Union[str, "os.PathLike[str]"]) -> "Inversion":
        """Reads an inversion file written by nulltext (``*.nti.safetensors``)."""
        return Inversion(_native.Inversion.load(os.fspath(path)))

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the inversion file; the file appears whole or not at all."""
        self._native.save(os.fspath(path))

    @property
    def prompt(self) -> str:
        """The caption the photo was inverted with."""
        return self._native.prompt

    @property
    def method(self) -> str:
        """``null-text``, ``null-text-global``, ``negative-prompt``, ``ddim`` or ``direct``."""
        return self._native.method

    @property
    def num_steps(self) -> int:
        return self._native.num_steps

    @property
    def guidance(self) -> float:
        return self._native.guidance

    @property
    def size(self) -> Tuple[int, int]:
        """(height, width) of the inverted image in pixels."""
        return self._native.size

    @property
    def model(self) -> str:
        """The model the inversion was made with, as it was named."""
        return self._native.model

    @property
    def model_fingerprint(self) -> str:
        return self._native.model_fingerprint

    @property
    def format_version(self) -> int:
        """The file format version this inversion is written as (1; 2 with offsets; 3 for
        SDXL)."""
        return self._native.format_version

    def _tensor(self, name: str) -> Tuple[bytes, List[int]]:
        t = self._native.tensor(name)
        assert t is not None, f"every inversion has `{name}`"
        return t

    @property
    def latent(self) -> np.ndarray:
        """z_T, ``[1, C, h, w]`` float32 (the file's ``latent_T``)."""
        return _array(self._tensor("latent"))

    @property
    def null_embeddings(self) -> np.ndarray:
        """The unconditional embedding of each sampling step, ``[T, 77, D]`` float32."""
        return _array(self._tensor("null_embeddings"))

    @property
    def null_pooled(self) -> Optional[np.ndarray]:
        """SDXL: the unconditional pooled embedding of each sampling step, ``[T, P]``."""
        return _maybe_array(self._native.tensor("null_pooled"))

    @property
    def image_latent(self) -> Optional[np.ndarray]:
        """z₀ of the photo, ``[1, C, h, w]``."""
        return _maybe_array(self._native.tensor("image_latent"))

    @property
    def latent_offsets(self) -> Optional[np.ndarray]:
        """Direct inversion's per-step offsets of the source row, ``[T, C, h, w]``."""
        return _maybe_array(self._native.tensor("latent_offsets"))

    @property
    def info(self) -> Dict[str, Any]:
        """What ``nulltext info --inversion FILE --json`` shows."""
        return json.loads(self._native.describe())

    @property
    def report(self) -> Optional[Dict[str, Any]]:
        """For an inversion made in this process: ``losses`` and ``iterations`` per step,
        ``unet_passes``, ``seconds_ddim``, ``seconds_optimization``. ``None`` when loaded."""
        r = self._native.report()
        return None if r is None else json.loads(r)

    def __repr__(self) -> str:
        h, w = self.size
        return (
            f"<nulltext.Inversion {self.method} of {self.prompt!r}, {w}×{h}, "
            f"{self.num_steps} steps, w = {self.guidance}>"
        )


@dataclass
class EditResult:
    """What an edit (or a reconstruction) produced."""

    #: PIL images: row 0 the source's reconstruction, then one per target.
    images: List[Image.Image]
    #: Final latents ``[B, C, h, w]`` float32, in the same order.
    latents: np.ndarray
    #: The prompts of the rows.
    prompts: List[str]
    #: The mode that ran: ``replace``, ``refine``, ``sdedit`` or ``reconstruction``.
    mode: str
    #: With ``attention_maps=True``: mean cross-attention per row ``[B, r_h, r_w, 77]``.
    attention_maps: Optional[np.ndarray] = None

    @property
    def arrays(self) -> List[np.ndarray]:
        """The images as H×W×3 ``uint8`` arrays."""
        return [np.asarray(im) for im in self.images]

    @staticmethod
    def _from(native: "_native.Output") -> "EditResult":
        return EditResult(
            images=[_pil(p) for p in native.images()],
            latents=_array(native.latents()),
            prompts=list(native.prompts),
            mode=native.mode,
            attention_maps=_maybe_array(native.attention_maps()),
        )


@dataclass(frozen=True)
class Token:
    """One position of an encoded prompt."""

    position: int
    id: int
    #: The vocabulary entry (``</w>`` ends a word).
    text: str
    #: The prompt's word this token belongs to (``None`` for the start and end tokens).
    word: Optional[str]


def _tokens(native: Tuple[list, Optional[str]]) -> List[Token]:
    rows, truncated = native
    if truncated is not None:
        import warnings

        warnings.warn(f"the prompt is longer than 77 tokens; cut off: \"{truncated}\"", stacklevel=3)
    return [Token(*r) for r in rows]


class Model:
    """A Stable Diffusion model, loaded by :func:`load`."""

    def __init__(self, native: "_native.Model"):
        self._native = native

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def fingerprint(self) -> str:
        """Identifies the weights; inversions remember it."""
        return self._native.fingerprint

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def dtype(self) -> str:
        return self._native.dtype

    @property
    def default_size(self) -> int:
        """The square size photos are resized to unless ``size`` says otherwise."""
        return self._native.default_size

    def invert(
        self,
        image: ImageLike,
        prompt: str,
        *,
        method: str = "null-text",
        steps: int = 50,
        guidance: float = 7.5,
        inner_steps: int = 10,
        early_stop: float = 1e-5,
        size: Optional[int] = None,
        crop: Optional[Tuple[int, int, int, int]] = None,
        max_pixels: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> Inversion:
        """Inverts a photo with its caption.

        ``method``: ``null-text`` (the paper: per-step optimized unconditional embeddings),
        ``direct`` (direct inversion: no optimization, about 150 UNet passes),
        ``null-text-global``, ``negative-prompt`` or ``ddim``. ``inner_steps`` and
        ``early_stop`` set null-text inversion's Adam iterations per step and its early stop.
        The photo's centre square (after ``crop`` = (left, right, top, bottom) pixels) is
        resized to ``size`` (default: the model's). Image files declaring more than
        ``max_pixels`` pixels are refused before they are decoded (default: the command
        line's ``--max-pixels``).
        """
        crop_spec = None if crop is None else ",".join(str(int(c)) for c in crop)
        return Inversion(
            self._native.invert(
                _rgb(image, "image"),
                prompt,
                method=method,
                steps=steps,
                guidance=guidance,
                inner_steps=inner_steps,
                early_stop=early_stop,
                size=size,
                crop=crop_spec,
                max_pixels=max_pixels,
                progress=progress,
            )
        )

    def edit(
        self,
        inversion: Inversion,
        targets: Union[str, Sequence[str]],
        *,
        mode: str = "auto",
        cross_replace: Union[float, Tuple[float, float], str] = 0.8,
        cross_replace_words: Optional[Mapping[str, Union[float, Tuple[float, float]]]] = None,
        self_replace: Union[float, Tuple[float, float], str] = 0.5,
        blend: Optional[Union[str, Tuple[Union[str, Sequence[str]], Union[str, Sequence[str]]]]] = None,
        blend_threshold: float = 0.3,
        blend_subtract: Optional[Union[str, Sequence[str]]] = None,
        attention_downscale: int = 4,
        reweight: Optional[Union[str, Mapping[str, float]]] = None,
        guidance: Optional[float] = None,
        sdedit: Optional[float] = None,
        attention_maps: bool = False,
        force: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> EditResult:
        """Edits an inversion by changing its caption (Prompt-to-Prompt).

        ``targets``: one caption or several (one batch). ``mode``: ``auto`` (replace for
        equal word counts, else refine), ``replace`` or ``refine``. ``cross_replace``: the
        fraction of steps (or a (start, end) window) during which the targets take the
        source's cross-attention; ``cross_replace_words`` gives words their own windows.
        ``self_replace``: the self-attention injection window. ``blend``: local blend, as
        ``("cat", "tiger")`` or ``"cat:tiger"`` — only where these words attend changes.
        ``reweight``: ``{"tiger": 2.0}`` scales a target word's attention.
        ``guidance``: the scale to sample with (default: the inversion's).
        ``sdedit``: SDEdit from this fraction of the noise instead of Prompt-to-Prompt.
        ``force``: use an inversion made with other weights.

        Returns an :class:`EditResult` whose ``images[0]`` is the reconstruction and
        ``images[1:]`` the edits.
        """
        if isinstance(targets, str):
            targets = [targets]
        cross = _window(cross_replace, "cross_replace")
        for word, window in (cross_replace_words or {}).items():
            cross += f",{word}={_window(window, 'cross_replace_words')}"
        blend_spec = None
        if blend is not None:
            blend_spec = (
                blend if isinstance(blend, str) else f"{_words(blend[0])}:{_words(blend[1])}"
            )
        if isinstance(reweight, Mapping):
            reweight = ",".join(f"{w}={float(s)!r}" for w, s in reweight.items())
        native = self._native.edit(
            inversion._native,
            list(targets),
            mode=mode,
            cross_replace=cross,
            self_replace=_window(self_replace, "self_replace"),
            blend=blend_spec,
            blend_threshold=blend_threshold,
            blend_subtract=None if blend_subtract is None else _words(blend_subtract),
            attention_downscale=attention_downscale,
            reweight=reweight,
            guidance=guidance,
            sdedit=sdedit,
            attention_maps=attention_maps,
            force=force,
            progress=progress,
        )
        return EditResult._from(native)

    def reconstruct(
        self,
        inversion: Inversion,
        *,
        force: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> EditResult:
        """Samples the inversion back without edits: ``images[0]`` is the reconstruction."""
        return EditResult._from(
            self._native.reconstruct(inversion._native, force=force, progress=progress)
        )

    def tokens(self, prompt: str) -> List[Token]:
        """How this model's tokenizer splits ``prompt``, and which word each token is of."""
        return _tokens(self._native.tokens(prompt))

    def __repr__(self) -> str:
        return f"<nulltext.Model {self.name!r} on {self.device}, {self.dtype}>"


def load(
    model: Union[str, "os.PathLike[str]"],
    *,
    device: str = "auto",
    dtype: str = "auto",
    model_config: Optional[Union[str, "os.PathLike[str]"]] = None,
    prediction_type: Optional[str] = None,
) -> Model:
    """Loads a Stable Diffusion model: a diffusers folder, a single ``.safetensors``
    checkpoint, or a Hugging Face repo id found in the local cache.

    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``metal``; ``dtype``: ``auto``
    (f32 on CPUs, f16 on GPUs), ``f32``, ``f16`` or ``bf16``. For single-file checkpoints,
    ``model_config`` names a diffusers folder with its configs and ``prediction_type`` is
    ``epsilon`` or ``v_prediction``.
    """
    return Model(
        _native.load(
            os.fspath(model),
            device=device,
            dtype=dtype,
            model_config=None if model_config is None else os.fspath(model_config),
            prediction_type=prediction_type,
        )
    )


def tokens(prompt: str) -> List[Token]:
    """How the bundled CLIP tokenizer splits ``prompt``, and which word each token is of."""
    return _tokens(_native.tokens(prompt))


def eval(
    reference: ImageLike,
    candidate: ImageLike,
    *,
    mask: Optional[ImageLike] = None,
    invert_mask: bool = False,
    ssim_window: str = "uniform",
    lpips: Optional[Union[str, "os.PathLike[str]"]] = None,
    dino: Optional[Union[str, "os.PathLike[str]"]] = None,
    clip: Optional[Union[str, "os.PathLike[str]"]] = None,
    caption: Optional[str] = None,
) -> Dict[str, float]:
    """PSNR (dB), SSIM and MSE of ``candidate`` against ``reference``, as ``nulltext eval``
    computes them: under ``mask`` (white counts; ``invert_mask`` takes its complement) both
    images are multiplied by it and compared whole, as PIE-Bench does. ``ssim_window``:
    ``uniform`` (scikit-image's default), ``gaussian`` (Wang et al.; torchmetrics up to
    1.4.1, PIE-Bench's published numbers) or ``gaussian-padded`` (torchmetrics since 1.4.2).
    ``lpips`` (weights as safetensors) adds ``"lpips"``; ``dino`` (DINO ViT weights as
    safetensors) adds PIE-Bench's ``"structure_distance"``; ``clip`` (a CLIP folder) with
    ``caption`` adds ``"clip_score"``. PSNR of identical images is ``inf``.
    """
    out = json.loads(
        _native.eval(
            _rgb(reference, "reference"),
            _rgb(candidate, "candidate"),
            mask=None if mask is None else _mask(mask),
            invert_mask=invert_mask,
            ssim_window=ssim_window,
            lpips=None if lpips is None else os.fspath(lpips),
            dino=None if dino is None else os.fspath(dino),
            clip=None if clip is None else os.fspath(clip),
            caption=caption,
        )
    )
    if out.get("psnr") is None:
        out["psnr"] = float("inf")
    return out
