"""The Python module end to end: the bundled shapes model's colour edit (the checks of the
Rust end-to-end tests), the inversion file as safetensors, results equal to the command
line's bit for bit on the fixture model, progress, Ctrl-C, the GIL, and bad input.

Run from the repository root after installing the package: ``pytest crates/nulltext-py/tests``.
The command-line comparison runs ``$NULLTEXT_CLI`` (default: ``target/debug/nulltext``).
"""

import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import nulltext

ROOT = Path(__file__).resolve().parents[3]
SHAPES = ROOT / "models" / "shapes"
TINY = ROOT / "tests" / "fixtures" / "models" / "tiny-sd15"
CHELSEA = ROOT / "tests" / "fixtures" / "inputs" / "chelsea256.png"
CAPTION = "a close up photo of a cat"

RED, GREEN, BLUE = np.array([220, 30, 30]), np.array([30, 170, 50]), np.array([30, 70, 220])


@pytest.fixture(scope="module")
def shapes():
    return nulltext.load(SHAPES, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return nulltext.load(TINY, device="cpu")


@pytest.fixture(scope="module")
def tiny_inversion(tiny):
    return tiny.invert(CHELSEA, CAPTION, steps=10, inner_steps=2)


def colour_error(img: Image.Image, mask: np.ndarray, colour: np.ndarray) -> float:
    """Mean absolute difference from `colour` over the masked pixels (0–255 scale)."""
    px = np.asarray(img).astype(np.float64)[mask]
    return float(np.abs(px - colour).mean())


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    p = np.pad(mask, r, constant_values=False)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= p[r + dy : r + dy + mask.shape[0], r + dx : r + dx + mask.shape[1]]
    return out


def test_colour_edit_recolours_the_shape_and_keeps_the_background(shapes):
    photo = SHAPES / "examples" / "red-circle-on-blue.png"
    # The shape and 3 pixels around it; eroding by 3 leaves the shape.
    region = np.asarray(Image.open(SHAPES / "examples" / "red-circle-on-blue.region.png").convert("L")) > 127
    shape, background = erode(region, 3), ~region
    inv = shapes.invert(photo, "a red circle on a blue background")
    assert inv.method == "null-text" and inv.size == (64, 64)
    res = shapes.edit(inv, "a green circle on a blue background")
    assert res.prompts == ["a red circle on a blue background", "a green circle on a blue background"]
    assert res.mode == "replace" and len(res.images) == 2 and res.latents.shape == (2, 4, 8, 8)
    rec, edited = res.images
    shape_err = colour_error(edited, shape, GREEN)
    was_red = colour_error(edited, shape, RED)
    bg_err = colour_error(edited, background, BLUE)
    print(f"shape vs green {shape_err:.1f}, vs red {was_red:.1f}; background vs blue {bg_err:.1f}")
    assert shape_err < 45 and shape_err < was_red / 2
    assert bg_err < 25
    # the source row reproduces the photo
    rec_bg = nulltext.eval(photo, rec, mask=background)["psnr"]
    print(f"reconstruction: background PSNR {rec_bg:.2f} dB")
    assert rec_bg > 30


def test_inversion_file_is_safetensors_and_round_trips(tiny_inversion, tmp_path):
    inv = tiny_inversion
    path = tmp_path / "cat.nti.safetensors"
    inv.save(path)
    tensors = load_file(str(path))
    assert np.array_equal(tensors["latent_T"], inv.latent)
    assert np.array_equal(tensors["null_embeddings"], inv.null_embeddings)
    assert np.array_equal(tensors["image_latent"], inv.image_latent)
    assert inv.null_embeddings.shape == (10, 77, 32) and inv.latent.dtype == np.float32
    back = nulltext.Inversion.load(path)
    assert (back.prompt, back.method, back.num_steps, back.guidance) == (CAPTION, "null-text", 10, 7.5)
    assert back.model_fingerprint == inv.model_fingerprint
    assert np.array_equal(back.null_embeddings, inv.null_embeddings)
    assert back.latent_offsets is None and back.format_version == 1
    assert back.report is None and len(inv.report["iterations"]) == 10
    assert back.info["method"] == "null-text"


def test_direct_inversion_reconstructs_the_pivot(tiny, tmp_path):
    inv = tiny.invert(CHELSEA, CAPTION, method="direct", steps=10)
    assert inv.latent_offsets.shape == (10, 4, 32, 32) and inv.format_version == 2
    rec = tiny.reconstruct(inv)
    z0 = inv.image_latent
    err = np.abs(rec.latents - z0).max() / (1 + np.abs(z0).max())
    assert err < 1e-5, err
    with pytest.raises(ValueError, match="direct inversion was made at guidance 7.5"):
        tiny.edit(inv, "a close up photo of a dog", guidance=5.0)


def test_an_sdxl_inversion_keeps_its_pooled_embeddings(tmp_path):
    sdxl = nulltext.load(ROOT / "tests" / "fixtures" / "models" / "tiny-sdxl", device="cpu")
    inv = sdxl.invert(CHELSEA, CAPTION, steps=3, inner_steps=2)
    assert inv.null_pooled.shape == (3, 12) and inv.format_version == 3
    assert np.abs(inv.null_pooled).max() > 0, "null-text optimizes the pooled embedding too"
    path = tmp_path / "cat.nti.safetensors"
    inv.save(path)
    assert np.array_equal(load_file(str(path))["null_pooled"], inv.null_pooled)
    out = sdxl.edit(inv, "a close up photo of a dog")
    assert len(out.images) == 2


def cli(*args):
    exe = os.environ.get("NULLTEXT_CLI", str(ROOT / "target" / "debug" / "nulltext"))
    if not Path(exe).is_file():
        pytest.fail(f"the command line to compare with is missing: {exe} (cargo build, or set NULLTEXT_CLI)")
    subprocess.run([exe, "--device", "cpu", "--quiet", *args], check=True, cwd=ROOT)


def test_results_equal_the_command_line_bit_for_bit(tiny, tmp_path):
    nti = tmp_path / "cli.nti.safetensors"
    latents = tmp_path / "edit.safetensors"
    target = "a close up photo of a dog"
    cli("invert", "-m", str(TINY), "-i", str(CHELSEA), "-p", CAPTION, "-o", str(nti),
        "--steps", "10", "--inner-steps", "2")
    cli("edit", "-m", str(TINY), "-i", str(nti), "-t", target, "--blend", "cat:dog",
        "--save-latents", str(latents))
    from_cli = load_file(str(nti))
    inv = tiny.invert(CHELSEA, CAPTION, steps=10, inner_steps=2)
    assert np.array_equal(inv.latent, from_cli["latent_T"])
    assert np.array_equal(inv.null_embeddings, from_cli["null_embeddings"])
    # pixels given as a PIL image invert the same as the file
    pil = tiny.invert(Image.open(CHELSEA), CAPTION, steps=10, inner_steps=2)
    assert np.array_equal(pil.null_embeddings, inv.null_embeddings)
    res = tiny.edit(inv, [target], blend=("cat", "dog"))
    assert np.array_equal(res.latents, load_file(str(latents))["latents"])
    # and the command line edits the Python module's file the same way
    py_nti = tmp_path / "py.nti.safetensors"
    inv.save(py_nti)
    cli("edit", "-m", str(TINY), "-i", str(py_nti), "-t", target, "--blend", "cat:dog",
        "--save-latents", str(latents))
    assert np.array_equal(res.latents, load_file(str(latents))["latents"])


def test_every_edit_option_is_a_keyword(tiny, tiny_inversion):
    res = tiny.edit(
        tiny_inversion,
        ["a close up photo of a fluffy cat", "a close up sketch of a cat"],
        mode="refine",
        cross_replace=(0.0, 0.6),
        cross_replace_words={"fluffy": 0.3},
        self_replace=0.3,
        blend=(["cat"], ["cat"]),
        blend_threshold=0.25,
        reweight={"fluffy": 2.0},
        attention_downscale=2,
        attention_maps=True,
    )
    assert res.mode == "refine" and len(res.images) == 3
    assert res.arrays[1].shape == (256, 256, 3) and res.arrays[1].dtype == np.uint8
    assert res.attention_maps.shape == (3, 16, 16, 77)
    assert all(im.size == (256, 256) for im in res.images)
    sd = tiny.edit(tiny_inversion, "a close up photo of a dog", sdedit=0.5)
    assert sd.mode == "sdedit"


def test_a_single_file_checkpoint_loads_like_its_folder(tiny, tiny_inversion):
    single = nulltext.load(TINY.parent / "tiny-sd15.safetensors", model_config=TINY, device="cpu")
    assert single.fingerprint == tiny.fingerprint and single.default_size == 256
    assert (single.device, single.dtype) == ("cpu", "f32")
    a = single.reconstruct(tiny_inversion).latents
    assert np.array_equal(a, tiny.reconstruct(tiny_inversion).latents)


def test_progress_reaches_the_callback(tiny):
    events = []
    tiny.invert(CHELSEA, CAPTION, steps=4, inner_steps=2, progress=events.append)
    kinds = {e["event"] for e in events}
    assert {"start", "advance", "iteration", "step_done", "finish"} <= kinds
    stages = [e["stage"] for e in events if e["event"] == "start"]
    assert stages == ["encoding image", "DDIM inversion", "null-text optimization"]


def test_an_exception_in_the_callback_stops_the_work(tiny):
    class Stop(Exception):
        pass

    def callback(e):
        if e["event"] == "iteration":
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        tiny.invert(CHELSEA, CAPTION, steps=10, inner_steps=5, progress=callback)


def test_ctrl_c_stops_long_work_with_keyboard_interrupt(tiny):
    started = threading.Event()

    def callback(e):
        if e["event"] == "iteration":
            started.set()

    def interrupt():
        started.wait(60)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        tiny.invert(CHELSEA, CAPTION, steps=50, inner_steps=10, early_stop=0.0, progress=callback)
    assert time.monotonic() - t < 60


def test_the_gil_is_released_while_computing(tiny):
    ticks = 0
    done = threading.Event()

    def work():
        tiny.invert(CHELSEA, CAPTION, steps=10, method="ddim")
        done.set()

    th = threading.Thread(target=work)
    th.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    th.join()
    assert ticks > 50, ticks


def test_tokens_name_their_words(shapes):
    toks = nulltext.tokens("a tiger, sitting")
    assert [t.word for t in toks] == [None, "a", "tiger,", "tiger,", "sitting", None]
    assert toks[1].text == "a</w>" and toks[0].id == 49406
    assert [t.word for t in shapes.tokens("a red circle")][1:4] == ["a", "red", "circle"]
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        nulltext.tokens("cat " * 100)


def test_eval_matches_the_metrics_of_the_command_line(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    b = a.copy()
    b[8:16, 8:16] = 255
    m = nulltext.eval(a, b)
    assert m["mse"] == pytest.approx(64 / 1024) and m["psnr"] == pytest.approx(10 * np.log10(16))
    assert nulltext.eval(a, a)["psnr"] == float("inf")
    mask = np.ones((32, 32), bool)
    mask[8:16, 8:16] = False
    assert nulltext.eval(a, b, mask=mask)["mse"] == 0
    assert nulltext.eval(a, b, mask=~mask, invert_mask=True)["mse"] == 0
    with pytest.raises(ValueError, match="differ in size"):
        nulltext.eval(a, b[:16])


def test_eval_computes_pie_bench_background_metrics_as_its_reference():
    """PIE-Bench's evaluate.py numbers on the fixture benchmark (tools/pie_bench_reference.py)."""
    import json

    bench = ROOT / "tests" / "fixtures" / "pie-bench"
    ref = json.loads((bench / "reference.json").read_text())["entries"]["600000000000"]["metrics"]
    photo = bench / "annotation_images" / "6_change_attribute_color_40" / "1_artificial" / "1_animal" / "600000000000.png"
    edited = bench / "edited" / "6_change_attribute_color_40" / "1_artificial" / "1_animal" / "600000000000.png"
    m = nulltext.eval(photo, edited, mask=bench / "masks" / "600000000000.png", invert_mask=True,
                      ssim_window="gaussian-padded")
    assert m["psnr"] == pytest.approx(ref["psnr_unedit_part"], rel=1e-5)
    assert m["mse"] == pytest.approx(ref["mse_unedit_part"], rel=1e-5)
    assert m["ssim"] == pytest.approx(ref["ssim_unedit_part"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown SSIM window"):
        nulltext.eval(photo, edited, ssim_window="box")


def test_bad_input_raises_the_right_exception(tiny, tiny_inversion, shapes, tmp_path):
    with pytest.raises(FileNotFoundError):
        nulltext.load(tmp_path / "no-such-model")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(nulltext.ModelError):
        nulltext.load(broken)
    with pytest.raises(FileNotFoundError):
        tiny.invert(tmp_path / "missing.png", CAPTION)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png"):
        tiny.invert(junk, CAPTION)
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        tiny.invert(np.zeros((8, 8), np.float32), CAPTION)
    with pytest.raises(ValueError, match="unknown method"):
        tiny.invert(CHELSEA, CAPTION, method="magic")
    with pytest.raises(ValueError, match="is empty"):
        tiny.invert(CHELSEA, "   ")
    with pytest.raises(ValueError, match="tiger"):
        tiny.edit(tiny_inversion, "a close up photo of a dog", blend=("tiger", "dog"))
    with pytest.raises(ValueError, match="cross_replace"):
        tiny.edit(tiny_inversion, "a close up photo of a dog", cross_replace="soon")
    with pytest.raises(ValueError, match="other weights|another model|made with"):
        shapes.edit(tiny_inversion, "a close up photo of a dog")
    with pytest.raises(ValueError, match="device"):
        nulltext.load(TINY, device="tpu")
    with pytest.raises(FileNotFoundError):
        nulltext.Inversion.load(tmp_path / "none.nti.safetensors")
    not_inv = tmp_path / "not.nti.safetensors"
    not_inv.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not.nti.safetensors"):
        nulltext.Inversion.load(not_inv)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        inv = tiny.invert(CHELSEA, "cat " * 100, steps=2, method="ddim")
    assert any("longer than 77 tokens" in str(x.message) for x in w)
    assert inv.prompt.startswith("cat cat")
