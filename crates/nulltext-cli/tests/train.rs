//! `nulltext train`: a few steps of each stage, a checkpoint, a resumed and extended run,
//! and a model folder that loads and generates like any Stable Diffusion.

mod common;

use common::{nulltext, read_json, s, succeeds, tmp};

fn state(dir: &std::path::Path) -> serde_json::Value {
    read_json(&dir.join("train/state.json"))
}

#[test]
fn trains_resumes_and_loads() {
    let d = tmp("train");
    let model = d.join("model");
    let export = d.join("export");
    let run = |vae_steps: Option<&str>, unet_steps: &str, extra: &[&str]| {
        let mut args = vec![
            "--quiet",
            "train",
            "--export-fp16",
            s(&export),
            "--out",
            s(&model),
            "--unet-steps",
            unet_steps,
            "--vae-batch",
            "2",
            "--unet-batch",
            "4",
            "--checkpoint-every",
            "2",
            "--latent-pool",
            "64",
        ];
        if let Some(v) = vae_steps {
            args.extend(["--vae-steps", v]);
        }
        args.extend(extra);
        succeeds(&args);
    };
    // a component's weights as written
    let weights =
        |c: &str| std::fs::read(model.join(c).join("diffusion_pytorch_model.safetensors")).unwrap();
    run(Some("3"), "2", &[]);
    let st = state(&model);
    assert_eq!(st["phase"], "done");
    assert_eq!(st["vae_losses"].as_array().unwrap().len(), 3);
    assert_eq!(st["unet_losses"].as_array().unwrap().len(), 2);
    // the attention-grounding term, on by default, recorded per step
    assert_eq!(st["attention_loss_weights"], serde_json::json!([[1, 0.05]]));
    let grounding = st["attention_losses"].as_array().unwrap();
    assert_eq!(grounding.len(), 2);
    assert!(grounding
        .iter()
        .all(|g| (0.0..=1.0).contains(&g[1].as_f64().unwrap())));
    let scale = st["scaling_factor"].as_f64().unwrap();
    assert!(scale.is_finite() && scale > 0.0);
    let vae_config = read_json(&model.join("vae/config.json"));
    assert_eq!(vae_config["scaling_factor"].as_f64().unwrap(), scale);
    for f in [
        "README.md",
        "train/loss.csv",
        "train/loss-vae.png",
        "train/loss-unet.png",
        "train/loss-grounding.png",
        "examples/red-circle-on-blue.png",
    ] {
        assert!(model.join(f).is_file(), "{f} missing");
    }
    let unet_before = weights("unet");

    // extending the UNet stage resumes from the checkpoint: the VAE is left as it was
    let vae_before = weights("vae");
    run(Some("3"), "4", &[]);
    let st = state(&model);
    assert_eq!(st["phase"], "done");
    assert_eq!(st["unet_losses"].as_array().unwrap().len(), 4);
    assert!(std::fs::read_to_string(model.join("README.md"))
        .unwrap()
        .contains("attention-grounding term (TokenCompose's token loss) × 5e-2"));
    assert_eq!(st["unet_losses"][3][0], 4);
    assert_eq!(weights("vae"), vae_before);
    assert_ne!(weights("unet"), unet_before);

    // resuming without --vae-steps leaves a finished run alone (the default 1500 does not
    // reopen the VAE stage)
    let unet_after = weights("unet");
    run(None, "4", &[]);
    assert_eq!(state(&model)["vae_losses"].as_array().unwrap().len(), 3);
    assert_eq!(weights("unet"), unet_after);

    // more VAE steps reopen the VAE stage (here with another KL weight, and no grounding
    // term); the UNet stage then runs again from step 0
    run(
        Some("5"),
        "2",
        &["--vae-kl-weight", "1e-5", "--attention-loss", "0"],
    );
    let st = state(&model);
    assert_eq!(st["phase"], "done");
    assert_eq!(st["vae_losses"].as_array().unwrap().len(), 5);
    assert_eq!(st["vae_losses"][4][0], 5);
    assert_eq!(
        st["vae_kl_weights"],
        serde_json::json!([[1, 1e-6], [4, 1e-5]])
    );
    let card = std::fs::read_to_string(model.join("README.md")).unwrap();
    assert!(
        card.contains("KL × 1e-6 (steps 1–3), then 1e-5 (from step 4)"),
        "{card}"
    );
    assert_eq!(st["unet_losses"].as_array().unwrap().len(), 2);
    // (the new UNet stage without the grounding term: its old values dropped with the stage)
    assert_eq!(st["attention_loss_weights"], serde_json::json!([[1, 0.0]]));
    assert!(st["attention_losses"].as_array().unwrap().is_empty());
    assert!(!card.contains("grounding term"));
    assert!(!model.join("train/loss-grounding.png").exists());
    assert_ne!(weights("vae"), vae_before);
    assert_ne!(weights("unet"), unet_after);

    // the half-precision copy: weights and what loading needs, no training state
    assert!(export
        .join("unet/diffusion_pytorch_model.fp16.safetensors")
        .is_file());
    assert!(export.join("text_encoder/model.fp16.safetensors").is_file());
    assert!(!export
        .join("unet/diffusion_pytorch_model.safetensors")
        .exists());
    assert!(!export.join("train").exists());

    // each folder is a Stable Diffusion model
    for m in [&model, &export] {
        let img = d.join("gen.png");
        succeeds(&[
            "--quiet",
            "generate",
            "--model",
            s(m),
            "--prompt",
            "a red circle on a blue background",
            "--steps",
            "5",
            "--out",
            s(&img),
        ]);
        let png = image::open(&img).unwrap();
        assert_eq!((png.width(), png.height()), (64, 64));
    }
}

#[test]
fn refuses_a_folder_that_holds_another_model() {
    let d = tmp("train-refuse");
    succeeds(&["random-model", "--preset", "tiny", "--out", s(&d.join("m"))]);
    let before = std::fs::read(d.join("m/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let out = nulltext(&["train", "--out", s(&d.join("m")), "--vae-steps", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without a training state"), "{err}");
    assert_eq!(
        std::fs::read(d.join("m/unet/diffusion_pytorch_model.safetensors")).unwrap(),
        before
    );
}
