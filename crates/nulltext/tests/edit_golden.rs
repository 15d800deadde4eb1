//! Prompt-to-Prompt parity with the PyTorch goldens: token bookkeeping (`seq_align.json`)
//! and the final latents of every golden edit of `chelsea.nti.safetensors`.

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use nulltext::edit::{align, Word};
use nulltext::models::ClipTokenizer;
use nulltext::NoProgress;
use serde_json::Value;

fn seq_align() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/seq_align.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn word_token_positions_match_reference() {
    let tok = ClipTokenizer::bundled();
    for case in seq_align()["word_inds"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let word = match &case["word"] {
            Value::String(s) => Word::Text(s.clone()),
            Value::Number(n) => Word::Index(n.as_u64().unwrap() as usize),
            w => panic!("{w}"),
        };
        let want: Vec<usize> = serde_json::from_value(case["inds"].clone()).unwrap();
        assert_eq!(
            align::word_positions(&tok, text, &word),
            want,
            "{text:?} {word:?}"
        );
    }
}

#[test]
fn refine_and_replace_mappers_match_reference() {
    let tok = ClipTokenizer::bundled();
    for pair in seq_align()["pairs"].as_array().unwrap() {
        let (x, y) = (
            pair["prompts"][0].as_str().unwrap(),
            pair["prompts"][1].as_str().unwrap(),
        );
        let want_map: Vec<i64> = serde_json::from_value(pair["refine_mapper"].clone()).unwrap();
        let want_alpha: Vec<f32> = serde_json::from_value(pair["refine_alphas"].clone()).unwrap();
        let (map, alpha) = align::refine_mapper(&tok, x, y);
        assert_eq!(alpha, want_alpha, "refine alphas {x:?} -> {y:?}");
        for j in 0..77 {
            if want_alpha[j] == 1.0 {
                assert_eq!(
                    map[j] as i64, want_map[j],
                    "refine mapper[{j}] {x:?} -> {y:?}"
                );
            } else {
                assert_eq!(want_map[j], -1);
            }
        }
        let Some(nz) = pair.get("replace_mapper_nonzero") else {
            continue;
        };
        let got = align::replacement_mapper(&tok, x, y).unwrap();
        let mut want = vec![[0f32; 77]; 77];
        for e in nz.as_array().unwrap() {
            want[e[0].as_u64().unwrap() as usize][e[1].as_u64().unwrap() as usize] =
                e[2].as_f64().unwrap() as f32;
        }
        if y.contains("hippopotamus") {
            // The reference maps every token after the swapped word with mapper[j, j]
            // (spec §5); nulltext maps source token i to target token j = i + 2.
            for i in 0..8 {
                assert_eq!(got[i], want[i], "row {i} before the offset");
            }
            for i in 8..75 {
                let mut row = [0f32; 77];
                row[i + 2] = 1.0;
                assert_eq!(
                    got[i],
                    row,
                    "row {i}: source token {i} -> target token {}",
                    i + 2
                );
            }
            assert!(
                want[8].iter().all(|v| *v == 0.0),
                "the golden records the reference's defect"
            );
        } else {
            assert_eq!(got, want, "replace mapper {x:?} -> {y:?}");
        }
    }
}

#[test]
fn cross_replace_alpha_per_word_matches_reference() {
    let sd = load_tiny();
    let ex = &seq_align()["time_words_alpha_example"];
    let case = serde_json::json!({"kind": "replace", "prompts": ex["prompts"], "cross_replace_steps": ex["cross_replace_steps"], "self_replace_steps": 0.5});
    let (prompts, opts) = case_options(&case);
    let c = nulltext::edit::build_controller(&sd, &prompts[0], &prompts[1..], &opts, 50, (32, 32))
        .unwrap();
    let want: Vec<Vec<usize>> =
        serde_json::from_value(ex["alpha_steps_x_prompt_x_token_nonzero_rows"].clone()).unwrap();
    assert_eq!(c.cross_alpha.len(), 51);
    // target 0 (dog): rows 0..40 all tokens; target 1 (tiger): default rows 0..40 but the
    // tiger token only in rows 5..20.
    let rows_for = |k: usize, tok: usize| -> Vec<usize> {
        (0..51)
            .filter(|r| {
                c.cross_alpha[*r]
                    .i((k, 0, 0, tok))
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    != 0.0
            })
            .collect()
    };
    assert_eq!(rows_for(0, 7), want[0]);
    assert_eq!(rows_for(1, 7), want[1]);
    assert_eq!(rows_for(1, 3), want[0]);
}

fn run_case(file: &str) {
    let sd = load_tiny();
    let meta = golden_metadata(file);
    let case: Value = serde_json::from_str(&meta["case"]).unwrap();
    let g = golden(file);
    let inv =
        nulltext::inversion_file::load(&fixtures().join("golden/chelsea.nti.safetensors")).unwrap();
    let (prompts, mut opts) = case_options(&case);
    assert_eq!(prompts[0], inv.prompt);
    opts.keep_step_latents = g.contains_key("step_latents");
    let res = nulltext::edit::edit(&sd, &inv, &prompts[1..], &opts, &mut NoProgress).unwrap();
    let c = res.controller.as_ref().unwrap();
    let range: Vec<usize> = serde_json::from_str(&meta["self_replace_step_range"]).unwrap();
    assert_eq!(c.self_window, (range[0], range[1]), "self-attention window");
    assert_eq!(
        c.self_max_pixels.to_string(),
        meta["self_replace_max_tokens"]
    );
    // token ids of the batch
    let ids: Vec<Vec<i64>> = g["token_ids"].to_vec2().unwrap();
    for (p, want) in prompts.iter().zip(&ids) {
        let got: Vec<i64> = sd
            .tokenizer
            .encode_padded(p)
            .ids
            .iter()
            .map(|x| *x as i64)
            .collect();
        assert_eq!(&got, want);
    }
    let alpha = Tensor::stack(&c.cross_alpha, 0).unwrap();
    assert_eq!(
        max_err(&alpha, &g["cross_replace_alpha"]),
        0.0,
        "cross-replace alpha"
    );
    if let Some(eq) = g.get("equalizer") {
        let got = c
            .equalizer
            .as_ref()
            .unwrap()
            .reshape((prompts.len() - 1, 77))
            .unwrap();
        assert_eq!(max_err(&got.i(0..1).unwrap(), eq), 0.0, "equalizer");
    }
    if let Some(bl) = g.get("blend_alpha_layers") {
        let got = &c.blend.as_ref().unwrap().words;
        assert_eq!(max_err(got, bl), 0.0, "blend words");
    }
    if let Some(sl) = g.get("step_latents") {
        let got = res.step_latents.as_ref().unwrap();
        let mut worst = 0f64;
        for i in 0..50 {
            let e = max_err(&got.i(i).unwrap(), &sl.i(i).unwrap());
            worst = worst.max(e / (1.0 + max_abs(&sl.i(i).unwrap())));
        }
        eprintln!("{file}: worst per-step relative latent error {worst:.3e}");
    }
    assert_close(
        &format!("{file} latents"),
        &res.latents,
        &g["latents"],
        1e-3,
    );
    let recon = golden("chelsea_recon.safetensors");
    let e = max_err(&res.latents.i(0..1).unwrap(), &recon["nti_recon_latent"]);
    eprintln!("{file}: row 0 vs the plain reconstruction: {e:.3e}");
    assert!(e < 1e-4, "row 0 is the reconstruction");
}

#[test]
fn edit_replace() {
    run_case("chelsea_p2p_replace.safetensors");
}

#[test]
fn edit_replace_3prompts_per_word_schedule() {
    run_case("chelsea_p2p_replace_3prompts.safetensors");
}

#[test]
fn edit_refine() {
    run_case("chelsea_p2p_refine.safetensors");
}

#[test]
fn edit_reweight() {
    run_case("chelsea_p2p_reweight.safetensors");
}

#[test]
fn edit_replace_blend() {
    run_case("chelsea_p2p_replace_blend.safetensors");
}

#[test]
fn edit_replace_blend_high_threshold() {
    run_case("chelsea_p2p_replace_blend_hi_th.safetensors");
}

#[test]
fn edit_refine_reweight_blend() {
    run_case("chelsea_p2p_refine_reweight_blend.safetensors");
}

#[allow(dead_code)]
fn _unused(_: DType) {}
