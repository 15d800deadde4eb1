"""The compiled half of nulltext (Rust). Use the `nulltext` module's API instead."""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

Pixels = Tuple[bytes, int, int]
Array = Tuple[bytes, List[int]]
ImageArg = Union[str, Pixels]
TokenList = Tuple[List[Tuple[int, int, str, Optional[str]]], Optional[str]]
Callback = Optional[Callable[[Dict[str, Any]], None]]

METHODS: List[str]

class ModelError(Exception): ...

class Output:
    prompts: List[str]
    mode: str
    def images(self) -> List[Pixels]: ...
    def latents(self) -> Array: ...
    def attention_maps(self) -> Optional[Array]: ...

class Inversion:
    prompt: str
    method: str
    num_steps: int
    guidance: float
    size: Tuple[int, int]
    model: str
    model_fingerprint: str
    format_version: int
    @staticmethod
    def load(path: str) -> Inversion: ...
    def save(self, path: str) -> None: ...
    def describe(self) -> str: ...
    def tensor(self, name: str) -> Optional[Array]: ...
    def report(self) -> Optional[str]: ...

class Model:
    name: str
    fingerprint: str
    device: str
    dtype: str
    default_size: int
    def invert(
        self,
        image: ImageArg,
        prompt: str,
        *,
        method: str,
        steps: int,
        guidance: float,
        inner_steps: int,
        early_stop: float,
        size: Optional[int],
        crop: Optional[str],
        max_pixels: Optional[int],
        progress: Callback,
    ) -> Inversion: ...
    def edit(
        self,
        inversion: Inversion,
        targets: List[str],
        *,
        mode: str,
        cross_replace: str,
        self_replace: str,
        blend: Optional[str],
        blend_threshold: float,
        blend_subtract: Optional[str],
        attention_downscale: int,
        reweight: Optional[str],
        guidance: Optional[float],
        sdedit: Optional[float],
        attention_maps: bool,
        force: bool,
        progress: Callback,
    ) -> Output: ...
    def reconstruct(self, inversion: Inversion, *, force: bool, progress: Callback) -> Output: ...
    def tokens(self, prompt: str) -> TokenList: ...

def load(
    model: str,
    *,
    device: str,
    dtype: str,
    model_config: Optional[str],
    prediction_type: Optional[str],
) -> Model: ...
def tokens(prompt: str) -> TokenList: ...
def eval(
    reference: ImageArg,
    candidate: ImageArg,
    *,
    mask: Optional[ImageArg],
    invert_mask: bool,
    ssim_window: str,
    lpips: Optional[str],
    dino: Optional[str],
    clip: Optional[str],
    caption: Optional[str],
) -> str: ...
