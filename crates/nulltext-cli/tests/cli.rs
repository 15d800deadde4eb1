//! End-to-end tests of the `nulltext` command on the tiny fixture model and real image
//! files, including bad input: each must fail with a one-line message naming the culprit
//! and write nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Runs a command that must succeed; returns its stdout and stderr.
fn ok(args: &[&str]) -> String {
    text(&succeeds(args))
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = nulltext(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "nulltext {args:?} should fail:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// `edit` of the inversion file `inv` on the tiny model, then `args`.
fn edit<'a>(inv: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["edit", "--model", tiny_arg(), "--inversion", s(inv)];
    v.extend(args);
    v
}

const CAT: &str = "a close up photo of a cat";
const DOG: &str = "a close up photo of a dog";

#[test]
fn tokens_json_lists_ids_tokens_and_words() {
    let out = ok(&["tokens", "--json", "-p", "a close-up photo of a cat"]);
    let v: serde_json::Value = serde_json::from_str(
        out.lines()
            .take_while(|l| !l.starts_with("warning"))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 77);
    assert_eq!(v["ids"][0], 49406);
    assert_eq!(v["tokens"][2], "close</w>");
    assert_eq!(v["words"][3], "close-up");
    assert_eq!(v["words"][8], "cat");
}

#[test]
fn invert_edit_reconstruct_round_trip() {
    let d = tmp("roundtrip");
    let inv = d.join("cat.nti.safetensors");
    let rec = d.join("rec.png");
    let out = ok(&invert_args(
        photo_arg(),
        CAT,
        &inv,
        &[
            "--steps",
            "10",
            "--inner-steps",
            "2",
            "--reconstruction",
            s(&rec),
            "--compare",
        ],
    ));
    assert!(out.contains("PSNR"), "{out}");
    assert!(out.contains("ddim (baseline)"), "{out}");
    assert!(inv.is_file() && rec.is_file());
    let loaded = nulltext::inversion_file::load(&inv).unwrap();
    assert_eq!(loaded.num_steps, 10);
    assert_eq!(loaded.null_embeddings.dims(), &[10, 77, 32]);
    assert_eq!(loaded.model_fingerprint, "f99da5222da910ce");

    // The reconstruction command gives the inversion's own reconstruction.
    let rec2 = d.join("rec2.png");
    let lat = d.join("z0.safetensors");
    ok(&reconstruct_args(&inv, &rec2, &["--save-latents", s(&lat)]));
    let a = image::open(&rec).unwrap().to_rgb8();
    let b = image::open(&rec2).unwrap().to_rgb8();
    assert!(nulltext::image_io::psnr(&a, &b) > 40.0);

    let edits = d.join("edits");
    let grid = d.join("grid.png");
    let maps = d.join("maps.png");
    let latents = d.join("latents.safetensors");
    let out = ok(&edit(
        &inv,
        &[
            "--target",
            DOG,
            "--target",
            "a close up photo of a tiger",
            "--blend",
            "cat:dog tiger",
            "--reweight",
            "tiger=2",
            "--cross-replace",
            "0.8,tiger=0.4",
            "--out-dir",
            s(&edits),
            "--grid",
            s(&grid),
            "--attention-maps",
            s(&maps),
            "--save-latents",
            s(&latents),
        ],
    ));
    assert!(out.contains("(replace)"), "{out}");
    for f in [
        "reconstruction.png",
        "01-a-close-up-photo-of-a-dog.png",
        "02-a-close-up-photo-of-a-tiger.png",
    ] {
        assert!(edits.join(f).is_file(), "{f}");
    }
    let g = image::open(&grid).unwrap();
    assert!(g.width() > 4 * 256, "input | reconstruction | 2 edits");
    assert!(image::open(&maps).unwrap().height() > 2 * 128);
    let t = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["latents"].dims(), &[3, 4, 32, 32]);

    // Refine (a word added) and SDEdit.
    let refine = d.join("refine");
    let fluffy = "a close up photo of a fluffy cat";
    let out = ok(&edit(&inv, &["--target", fluffy, "--out-dir", s(&refine)]));
    assert!(out.contains("(refine)"), "{out}");
    let sdedit = d.join("sdedit");
    let out = ok(&edit(
        &inv,
        &["--target", DOG, "--sdedit", "0.5", "--out-dir", s(&sdedit)],
    ));
    assert!(out.contains("sdedit"), "{out}");

    // Bad edits: clear errors naming the word or value, nothing written.
    let bad = d.join("bad");
    for (args, says) in [
        (
            &["--target", fluffy, "--mode", "replace"][..],
            &["as many words", "fluffy"][..],
        ),
        (&["--target", DOG, "--blend", "cat:zebra"], &["`zebra`"]),
        (&["--target", DOG, "--blend", "horse:dog"], &["`horse`"]),
        (&["--target", DOG, "--reweight", "zebra=2"], &["`zebra`"]),
        (
            &["--target", DOG, "--cross-replace", "1.5"],
            &["--cross-replace", "1.5"],
        ),
    ] {
        let mut args = args.to_vec();
        args.extend(["--out-dir", s(&bad)]);
        let e = fails(&edit(&inv, &args));
        for say in says {
            assert!(e.contains(say), "{args:?}: {e}");
        }
    }
    assert!(!bad.exists(), "nothing written for bad edits");

    // An inversion from another model.
    let other = d.join("other");
    ok(&[
        "random-model",
        "--preset",
        "tiny",
        "--seed",
        "7",
        "--out",
        s(&other),
    ]);
    let mut args = edit(&inv, &["--target", DOG, "--out-dir", s(&bad)]);
    args[2] = s(&other); // in place of the tiny model
    let e = fails(&args);
    assert!(e.contains("fingerprint") && e.contains("--force"), "{e}");
    assert!(!bad.exists());

    // A truncated inversion file.
    let trunc = d.join("trunc.nti.safetensors");
    let bytes = std::fs::read(&inv).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let png = bad.join("x.png");
    let e = fails(&reconstruct_args(&trunc, &png, &[]));
    assert!(e.contains("trunc.nti.safetensors"), "{e}");
    assert!(!bad.exists());
}

/// `invert --method direct` writes a version-2 file with offsets; its reconstruction is the
/// photo's own latent; `info --inversion` names the method; an edit at another guidance
/// scale is refused before any work, and one at the file's scale runs.
#[test]
fn direct_inversion_from_the_command_line() {
    let d = tmp("direct");
    let inv = d.join("cat.nti.safetensors");
    let direct = ["--steps", "10", "--method", "direct"];
    let out = ok(&invert_args(photo_arg(), CAT, &inv, &direct));
    assert!(
        out.contains("inverted") && out.contains("with direct"),
        "{out}"
    );
    let loaded = nulltext::inversion_file::load(&inv).unwrap();
    assert_eq!(loaded.method, nulltext::Method::Direct);
    assert_eq!(
        loaded.latent_offsets.as_ref().unwrap().dims(),
        &[10, 4, 32, 32]
    );
    // reconstruction = the VAE round trip, up to rounding
    let line = out.lines().find(|l| l.contains("(this file)")).unwrap();
    let mse: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
    assert!(mse < 1e-9, "{line}");

    let info = ok(&["info", "--inversion", s(&inv), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["method"], "direct");
    assert_eq!(v["format"], "nulltext-inversion/2");

    let grid = d.join("grid.png");
    let e = fails(&edit(
        &inv,
        &["--target", DOG, "--guidance", "5", "--grid", s(&grid)],
    ));
    assert!(e.contains("made at guidance 7.5"), "{e}");
    assert!(!grid.exists());
    ok(&edit(&inv, &["--target", DOG, "--grid", s(&grid)]));
    assert!(grid.is_file());
}

#[test]
fn generate_writes_a_png() {
    let d = tmp("generate");
    let out = d.join("g.png");
    ok(&[
        "generate",
        "--model",
        tiny_arg(),
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--seed",
        "1",
        "--out",
        s(&out),
    ]);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (256, 256));
}

#[test]
fn bad_models_are_named() {
    let d = tmp("badmodels");
    let png = d.join("x.png");
    let generate = |model: &Path| fails(&generate_args(model, &png));
    // Missing folder.
    let e = generate(&d.join("nope"));
    assert!(e.contains("nope"), "{e}");
    // Missing config key.
    let m = model_copy("nokey", false);
    let cfg = m.join("unet/config.json");
    let mut v = read_json(&cfg);
    v.as_object_mut().unwrap().remove("cross_attention_dim");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = generate(&m);
    assert!(
        e.contains("cross_attention_dim") && e.contains("unet/config.json"),
        "{e}"
    );
    // Wrong tensor shape (config says 48, weights are 32 wide).
    v["cross_attention_dim"] = serde_json::json!(48);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = generate(&m);
    assert!(
        e.contains("attn2.to_k.weight") && e.contains("[32, 48]"),
        "{e}"
    );
    // Corrupt safetensors.
    let m = model_copy("corrupt", false);
    let f = m.join("vae/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let e = generate(&m);
    assert!(
        e.contains("vae/diffusion_pytorch_model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
    assert!(!png.exists());
    // Only .bin weights.
    let m = model_copy("bin", false);
    std::fs::remove_file(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(m.join("unet/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    let e = generate(&m);
    assert!(e.contains(".bin") && e.contains("safetensors"), "{e}");
    // A repo id that is not in the cache.
    let e = fails(&["info", "--model", "nobody/no-such-model"]);
    assert!(
        e.contains("nobody/no-such-model") && e.contains("cache"),
        "{e}"
    );
}

#[test]
fn bad_images_are_refused_before_any_work() {
    let d = tmp("badimages");
    let out = d.join("x.nti.safetensors");
    let run = |img: &Path| fails(&invert_args(s(img), "a cat", &out, &[]));
    let e = run(&d.join("missing.png"));
    assert!(e.contains("missing.png"), "{e}");
    let text = d.join("notes.png");
    std::fs::write(&text, "this is not an image").unwrap();
    let e = run(&text);
    assert!(e.contains("notes.png"), "{e}");
    let tiny_img = d.join("one.png");
    image::RgbImage::new(1, 1).save(&tiny_img).unwrap();
    let e = run(&tiny_img);
    assert!(e.contains("one.png") && e.contains("1×1"), "{e}");
    let empty = d.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let e = run(&empty);
    assert!(e.contains("empty.png"), "{e}");
    assert!(!out.exists());
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let words: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
    let prompt = words.join(" ");
    let out = ok(&["tokens", "-p", &prompt]);
    assert!(out.contains("longer than 77 tokens"), "{out}");
    assert!(out.contains("77 of 77"), "{out}");
}

#[test]
fn models_are_found_in_the_hugging_face_cache() {
    let home = tmp("hfhome");
    let snap = home.join("hub/models--acme--tiny-sd/snapshots/0123abcd");
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(tiny().canonicalize().unwrap(), &snap).unwrap();
    std::fs::create_dir_all(home.join("hub/models--acme--tiny-sd/refs")).unwrap();
    std::fs::write(home.join("hub/models--acme--tiny-sd/refs/main"), "0123abcd").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nulltext"))
        .args(["info", "--json", "--model", "acme/tiny-sd"])
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("f99da5222da910ce"), "{stdout}");
}

#[test]
fn single_file_checkpoints_load_from_the_cli() {
    let single = root().join("tests/fixtures/models/tiny-sd15.safetensors");
    let out = ok(&[
        "info",
        "--json",
        "--model",
        s(&single),
        "--model-config",
        tiny_arg(),
    ]);
    assert!(
        out.contains("f99da5222da910ce") && out.contains("single file"),
        "{out}"
    );
    let d = tmp("sf-cli");
    let file = d.join("v.safetensors");
    ok(&[
        "random-model",
        "--preset",
        "tiny-v",
        "--single-file",
        s(&file),
    ]);
    let out = ok(&[
        "info",
        "--json",
        "--model",
        s(&file),
        "--prediction-type",
        "v_prediction",
    ]);
    assert!(
        out.contains("v_prediction") && out.contains("\"text_hidden_size\": 64"),
        "{out}"
    );
    // an SDXL single file (`conditioner.embedders.*`), configs from the same weights' folder
    let (xl, xl_dir) = (d.join("xl.safetensors"), d.join("xl"));
    ok(&[
        "random-model",
        "--preset",
        "tiny-sdxl",
        "--out",
        s(&xl_dir),
        "--single-file",
        s(&xl),
    ]);
    let out = ok(&[
        "info",
        "--json",
        "--model",
        s(&xl),
        "--model-config",
        s(&xl_dir),
    ]);
    assert!(
        out.contains("SDXL") && out.contains("single file") && out.contains("text_encoder_2"),
        "{out}"
    );
}

#[test]
fn ctrl_c_stops_cleanly_and_writes_nothing() {
    let d = tmp("ctrlc");
    let out = d.join("cat.nti.safetensors");
    let child = command(&invert_args(photo_arg(), "a cat", &out, &[]), "2")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    interrupt(child.id());
    let res = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!out.exists(), "no inversion file after Ctrl-C");
    let leftovers: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "no temporary files left: {leftovers:?}"
    );
}

#[test]
fn a_300_word_prompt_is_truncated_with_a_warning() {
    let d = tmp("long");
    let words: Vec<String> = (0..300).map(|i| format!("word{i}")).collect();
    let (prompt, inv) = (words.join(" "), d.join("x.nti.safetensors"));
    let short = ["--steps", "2", "--inner-steps", "1"];
    let out = ok(&invert_args(photo_arg(), &prompt, &inv, &short));
    assert!(out.contains("longer than 77 tokens"), "{out}");
    assert!(inv.is_file());
}

#[test]
fn info_reports_the_fixture_model() {
    let out = ok(&["info", "--model", tiny_arg(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(v["fingerprint"], "f99da5222da910ce");
    assert_eq!(v["image_size"], 256);
    assert_eq!(v["prediction_type"], "epsilon");
}

/// `demo` with its defaults, from the repository root: the bundled shapes model inverts its
/// bundled red circle and edits it to a green one.
#[test]
fn demo_runs_the_main_job_on_the_bundled_model() {
    let d = tmp("demo");
    // runs from the repository root, must succeed; its stderr
    let in_root = |args: &[&str]| {
        let out = command(args, "2").current_dir(root()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let err = in_root(&["demo", "--out-dir", s(&d), "--inner-steps", "3"]);
    for f in [
        "inversion.nti.safetensors",
        "reconstruction.png",
        "grid.png",
        "attention.png",
    ] {
        assert!(d.join(f).is_file(), "{f} missing:\n{err}");
    }
    let edited: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("green"))
        .collect();
    assert!(!edited.is_empty(), "no edited image in {}", d.display());

    // The demo takes the maps at the latent's own 8×8 (no warning), and there the word
    // "circle" attends most to the circle: its map's brightest cell lies on a red pixel of
    // the input.
    assert!(!err.contains("warning"), "{err}");
    let input = image::open(root().join("models/shapes/examples/red-circle-on-blue.png"))
        .unwrap()
        .to_rgb8();
    let sheet = image::open(d.join("attention.png")).unwrap().to_rgb8();
    // The maps' tiles are 128 px, 8×8 cells of 16 px; the source row's tokens are
    // <start> a red circle …
    let (tile, cell) = (128, 16);
    let (x0, y0) = (
        nulltext::plot::render::tile_x(3, tile),
        nulltext::plot::render::PAD,
    );
    let brightest = (0..8 * 8)
        .max_by_key(|&c| {
            sheet
                .get_pixel(x0 + (c % 8) * cell + 4, y0 + (c / 8) * cell + 4)
                .0[0]
        })
        .unwrap();
    let at = input
        .get_pixel((brightest % 8) * 8 + 4, (brightest / 8) * 8 + 4)
        .0;
    assert!(
        at[0] > 150 && at[2] < 100,
        "\"circle\" peaks at cell {brightest}, input {at:?}"
    );

    // The default scale on these latents leaves 2×2 maps: `edit` says so.
    let inv = d.join("inversion.nti.safetensors");
    let coarse = d.join("coarse.png");
    let err = in_root(&[
        "edit",
        "-m",
        "models/shapes",
        "-i",
        s(&inv),
        "-t",
        "a green circle on a blue background",
        "--attention-maps",
        s(&coarse),
    ]);
    assert!(
        err.contains("--attention-downscale 4 leaves 2×2 attention maps on this model's 8×8 latents; --attention-downscale 1 gives 8×8"),
        "{err}"
    );
}

#[test]
fn an_unknown_unet_execution_in_the_environment_is_refused() {
    let tokens_with = |execution: &str| -> Output {
        Command::new(env!("CARGO_BIN_EXE_nulltext"))
            .args(["tokens", "-p", "a cat"])
            .env("NULLTEXT_CONTEXT_TAPE", execution)
            .output()
            .unwrap()
    };
    let out = tokens_with("fast");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("NULLTEXT_CONTEXT_TAPE: unknown UNet execution `fast`"),
        "{err}"
    );
    assert!(tokens_with("off").status.success());
}

/// An SDXL model runs the same commands: a direct inversion (with the DDIM baseline), an
/// edit with a local blend, a reconstruction and `generate`; an SD 1.x inversion is
/// refused by the SDXL model.
#[test]
fn sdxl_model_runs_the_same_commands() {
    let d = tmp("sdxl");
    let sdxl = static_arg(&root().join("tests/fixtures/models/tiny-sdxl"));
    let inv = d.join("cat.nti.safetensors");
    let extra = ["--method", "direct", "--steps", "10", "--compare"];
    let mut args = invert_args(photo_arg(), CAT, &inv, &extra);
    args[2] = sdxl; // the model, in place of the tiny SD 1.5
    let out = ok(&args);
    assert!(out.contains("ddim (baseline)"), "{out}");
    let loaded = nulltext::inversion_file::load(&inv).unwrap();
    assert_eq!(loaded.null_pooled.unwrap().dims(), &[10, 12]);
    let grid = d.join("grid.png");
    let mut args = edit(
        &inv,
        &["--target", DOG, "--blend", "cat:dog", "--grid", s(&grid)],
    );
    args[2] = sdxl; // the model, in place of the tiny SD 1.5
    ok(&args);
    assert!(grid.is_file());
    let rec = d.join("rec.png");
    ok(&[
        "reconstruct",
        "--model",
        sdxl,
        "--inversion",
        s(&inv),
        "--out",
        s(&rec),
    ]);
    let pic = d.join("gen.png");
    ok(&[
        "generate",
        "--model",
        sdxl,
        "--prompt",
        DOG,
        "--steps",
        "5",
        "--out",
        s(&pic),
    ]);
    assert_eq!(image::open(&pic).unwrap().width(), 256);

    let sd15 = d.join("sd15.nti.safetensors");
    ok(&invert_args(
        photo_arg(),
        CAT,
        &sd15,
        &["--method", "ddim", "--steps", "2"],
    ));
    let err = fails(&[
        "edit",
        "--model",
        sdxl,
        "--inversion",
        s(&sd15),
        "--target",
        DOG,
    ]);
    assert!(err.contains("fingerprint"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `bench` times every stage it is asked for and writes them as JSON, with the peak memory
/// and the tensors each run creates; in half precision (candle's ops, as on GPUs) the
/// context tape creates fewer than candle's autograd graph (1.6× fewer on this tiny model,
/// 2.7× on SD 1.5's shapes), which is what it is for.
#[test]
fn bench_reports_times_memory_and_tensors() {
    let d = tmp("bench");
    let json = d.join("bench.json");
    let stages = "text_encoder,unet_b1,nti_iter,nti_iter_graph,vae_decode";
    let out = ok(&[
        "--dtype",
        "f16",
        "bench",
        "--model",
        tiny_arg(),
        "--size",
        "64",
        "--only",
        stages,
        "--repeat",
        "2",
        "--warmup",
        "1",
        "--json",
        s(&json),
    ]);
    assert!(out.contains("tensors"), "{out}");
    let v = read_json(&json);
    assert_eq!(v["dtype"], "F16", "{v}");
    let rows = v["results"].as_array().unwrap();
    let row = |stage: &str| {
        rows.iter()
            .find(|r| r["stage"] == stage)
            .unwrap_or_else(|| panic!("{stage}: {v}"))
    };
    for stage in stages.split(',') {
        let r = row(stage);
        let (min, med, max) = (
            r["min_s"].as_f64().unwrap(),
            r["median_s"].as_f64().unwrap(),
            r["max_s"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= med && med <= max, "{r}");
        assert!(r["peak_rss_gib"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["tensors"].as_u64().unwrap() > 0, "{r}");
    }
    let tensors = |stage: &str| row(stage)["tensors"].as_u64().unwrap();
    assert!(tensors("unet_b1") < tensors("nti_iter"), "{v}");
    assert!(
        3 * tensors("nti_iter") < 2 * tensors("nti_iter_graph"),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
