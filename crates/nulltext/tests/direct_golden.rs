//! Direct inversion (Ju et al., ICLR 2024) against PyTorch goldens on the fixture model:
//! the offsets, the reconstruction, and Prompt-to-Prompt edits whose source row carries the
//! offsets (`chelsea_direct*.safetensors`, see tests/fixtures/README.md).

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::OnceLock;

use candle_core::{IndexOp, Tensor};
use common::*;
use nulltext::edit::EditOptions;
use nulltext::{InvertOptions, Method, NoProgress};
use serde_json::Value;

/// The fixture photo's direct inversion at w = 7.5, made once for every test here.
fn inversion() -> &'static (nulltext::StableDiffusion, nulltext::Inversion) {
    static INV: OnceLock<(nulltext::StableDiffusion, nulltext::Inversion)> = OnceLock::new();
    INV.get_or_init(|| {
        let sd = load_tiny();
        let z0 = chelsea_latent(&sd);
        let opts = InvertOptions {
            method: Method::Direct,
            ..Default::default()
        };
        let (inv, report) = invert_chelsea(&sd, &z0, &opts);
        // the offset walk ends where the source branch of every edit ends: on z*₀
        let end = report.final_latent.as_ref().unwrap();
        assert_relative("the offset walk's end vs z*0", end, &z0, 1e-5);
        (sd, inv)
    })
}

/// max |a − b| ≤ tol · max |b|.
fn assert_relative(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let (e, m) = (max_err(a, b), max_abs(b));
    eprintln!("{what}: max error {e:.3e} (max {m:.3})");
    assert!(
        e <= tol * m,
        "{what}: max error {e:.3e} > {tol:.0e} × {m:.3}"
    );
}

#[test]
fn offsets_match_the_authors_code() {
    let (_, inv) = inversion();
    let g = golden("chelsea_direct.safetensors");
    assert_close("z_T", &inv.latent_t, &g["latent_T"], 1e-4);
    let offsets = inv.latent_offsets.as_ref().unwrap();
    assert_eq!(offsets.dims(), [50, 4, 32, 32]);
    assert_close("latent offsets", offsets, &g["latent_offsets"], 1e-4);
    // The offsets are small next to the latents but not negligible: the test can fail.
    let size = max_abs(&g["latent_offsets"]);
    assert!(size > 1e-3, "offsets of size {size:.3e}");
    // The unconditional input of every step is the empty caption's embedding.
    let sd = &inversion().0;
    let empty = sd.encode_prompt("").unwrap();
    for i in [0, 49] {
        assert_eq!(
            max_err(&inv.null_embeddings.i(i..i + 1).unwrap(), &empty.context),
            0.0
        );
    }
}

#[test]
fn reconstruction_is_the_pivot() {
    let (sd, inv) = inversion();
    let g = golden("chelsea_direct.safetensors");
    let rec = nulltext::reconstruct(sd, inv, &mut NoProgress).unwrap();
    let z0 = inv.image_latent.as_ref().unwrap();
    assert_relative("reconstruction vs z*0", &rec, z0, 1e-5);
    assert_close("reconstruction vs golden", &rec, &g["recon_latent"], 1e-4);
    // Without the offsets the same sampling misses the photo by far more.
    let mut plain = inv.clone();
    plain.latent_offsets = None;
    plain.method = Method::Ddim;
    let off = nulltext::reconstruct(sd, &plain, &mut NoProgress).unwrap();
    assert!(max_err(&off, z0) > 100.0 * max_err(&rec, z0));
}

/// Edits the direct inversion as the golden `file`'s case `name` says and compares the
/// final latents.
fn run_case(file: &str, name: &str, tensor: &str) {
    let (sd, inv) = inversion();
    let meta = golden_metadata(file);
    let cases: Vec<Value> = serde_json::from_str(&meta["cases"]).unwrap();
    let case = cases.iter().find(|c| c["name"] == name).unwrap();
    let (prompts, opts) = case_options(case);
    assert_eq!(prompts[0], inv.prompt);
    let res = nulltext::edit::edit(sd, inv, &prompts[1..], &opts, &mut NoProgress).unwrap();
    let g = golden(file);
    assert_close(&format!("{file} {name}"), &res.latents, &g[tensor], 1e-4);
    // the source row is the photo's latent, edits or not
    let z0 = inv.image_latent.as_ref().unwrap();
    assert_relative("source row vs z*0", &res.latents.i(0..1).unwrap(), z0, 1e-5);
}

#[test]
fn replace_edit_matches_golden() {
    run_case("chelsea_direct.safetensors", "replace", "edit_replace");
}

#[test]
fn refine_edit_matches_the_authors_code() {
    run_case("chelsea_direct_p2p.safetensors", "refine", "refine");
}

#[test]
fn blend_edit_matches_the_authors_code() {
    run_case(
        "chelsea_direct_p2p.safetensors",
        "replace_blend",
        "replace_blend",
    );
}

#[test]
fn other_guidance_is_refused() {
    let (sd, inv) = inversion();
    let opts = EditOptions {
        guidance: Some(5.0),
        ..Default::default()
    };
    let targets = ["a close up photo of a dog".to_string()];
    let e = nulltext::edit::edit(sd, inv, &targets, &opts, &mut NoProgress)
        .err()
        .expect("a direct inversion edits only at its own guidance")
        .to_string();
    assert!(
        e.contains("made at guidance 7.5") && e.contains("--guidance 5"),
        "{e}"
    );
    // other methods may be edited at any scale
    let mut ddim = inv.clone();
    ddim.latent_offsets = None;
    ddim.method = Method::Ddim;
    assert_eq!(
        nulltext::edit::edit_guidance(&ddim, Some(5.0)).unwrap(),
        5.0
    );
}
