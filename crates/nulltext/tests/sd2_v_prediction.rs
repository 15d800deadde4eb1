//! Null-text inversion on an SD 2.x-shaped, v-prediction model loaded from a single-file
//! checkpoint: it must beat plain DDIM inversion, as on SD 1.x.

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::*;
use nulltext::models::random::{write_random_single_file, Preset};
use nulltext::models::LoadOptions;
use nulltext::{InvertOptions, Method, NoProgress};

#[test]
fn null_text_beats_ddim_on_a_v_prediction_single_file_model() {
    let dir = std::env::temp_dir().join(format!("nulltext-sd2v-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny-v.safetensors");
    write_random_single_file(&file, &Preset::TinyV.configs(), true, 5).unwrap();
    let opts = LoadOptions {
        prediction_type: Some("v_prediction".into()),
        ..load_options()
    };
    let sd = nulltext::StableDiffusion::load(file.to_str().unwrap(), &opts).unwrap();
    assert_eq!(sd.scheduler.prediction_type, "v_prediction");
    let img = nulltext::image_io::load_image(
        &fixtures().join("inputs/chelsea256.png"),
        Default::default(),
        256,
    )
    .unwrap();
    let mut mse = Vec::new();
    for method in [Method::Ddim, Method::NullText] {
        let o = InvertOptions {
            method,
            num_steps: 10,
            inner_steps: 5,
            ..Default::default()
        };
        let (inv, _) =
            nulltext::invert_image(&sd, &img, "a close up photo of a cat", &o, &mut NoProgress)
                .unwrap();
        let rec = nulltext::reconstruct(&sd, &inv, &mut NoProgress).unwrap();
        let z0 = inv
            .image_latent
            .as_ref()
            .unwrap()
            .to_device(&sd.device)
            .unwrap();
        let m = common::mse(&rec, &z0);
        eprintln!("{method}: reconstruction latent MSE {m:.5}");
        mse.push(m);
    }
    assert!(
        mse[1] < 0.75 * mse[0],
        "null-text {} vs ddim {}",
        mse[1],
        mse[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
