//! Single-file checkpoints (original CompVis/A1111 layout): the fixture written by
//! diffusers' own conversion script, and SD 2.x-shaped (OpenCLIP, v-prediction) random
//! models written in both layouts by nulltext's random-model tool.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use nulltext_models::random::{write_random_model, write_random_single_file, Preset};
use nulltext_models::single_file;
use nulltext_models::{LoadOptions, StableDiffusion};

fn single() -> PathBuf {
    fixtures().join("models/tiny-sd15.safetensors")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nulltext-sf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn same_bits(what: &str, a: &Tensor, b: &Tensor) {
    let e = max_err(a, b);
    eprintln!("{what}: max|difference| = {e:e}");
    assert_eq!(e, 0.0, "{what} differs between the layouts");
}

/// ε, text embeddings and decoded image of a model on fixed inputs.
fn outputs(sd: &StableDiffusion) -> (Tensor, Tensor, Tensor) {
    let g = golden("unet_eps.safetensors");
    let x = on_device(&g["x"].i(0..1).unwrap());
    let emb = sd
        .encode_prompts(&["a close up photo of a cat", ""])
        .unwrap()
        .0
        .context;
    let c = sd.context_dim();
    let ctx = emb.i(0..1).unwrap().narrow(2, 0, c).unwrap();
    let eps = sd.unet.forward(&x, 501.0, &ctx).unwrap();
    let img = sd.latent_to_image(&x).unwrap();
    (eps, emb, img)
}

#[test]
fn diffusers_converted_fixture_matches_the_folder() {
    let folder = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    let opts = LoadOptions {
        config_dir: Some(tiny_model()),
        ..load_options()
    };
    let sf = StableDiffusion::load(single().to_str().unwrap(), &opts).unwrap();
    assert_eq!(
        sf.fingerprint, "f99da5222da910ce",
        "same fingerprint in both layouts"
    );
    let (e1, t1, i1) = outputs(&folder);
    let (e2, t2, i2) = outputs(&sf);
    same_bits("UNet ε", &e1, &e2);
    same_bits("text embeddings", &t1, &t2);
    same_bits("VAE decoder", &i1, &i2);
}

#[test]
fn architecture_is_read_off_the_shapes() {
    let shapes = single_file::read_shapes(&single()).unwrap();
    let d = single_file::detect(&shapes).unwrap();
    assert_eq!(d.unet.block_out_channels, vec![32, 64, 64, 64]);
    assert_eq!(d.unet.cross_attention_dim, 32);
    assert!(!d.unet.use_linear_projection);
    assert_eq!(
        d.unet.down_block_types,
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D"
        ]
    );
    assert_eq!(
        d.unet.up_block_types,
        [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D"
        ]
    );
    assert_eq!(d.layers_per_block, 2);
    assert_eq!(d.vae.block_out_channels, vec![32, 32, 64, 64]);
    assert_eq!(d.vae.latent_channels, 4);
    assert_eq!(
        (
            d.text.hidden_size,
            d.text.num_hidden_layers,
            d.text.intermediate_size
        ),
        (32, 4, 64)
    );
    assert!(!d.openclip);
    // every tensor of the file is claimed by a renaming
    assert!(single_file::unclaimed_keys(&shapes, &d).is_empty());
    // and the inferred model loads (its head counts are SD's defaults, so the numbers differ)
    let sd = StableDiffusion::load(single().to_str().unwrap(), &load_options()).unwrap();
    assert_eq!(sd.fingerprint, "f99da5222da910ce");
}

#[test]
fn sd2_v_prediction_model_loads_identically_from_both_layouts() {
    let d = tmp("tinyv");
    let configs = Preset::TinyV.configs();
    write_random_model(&d.join("folder"), &configs, 11, false).unwrap();
    let file = d.join("tiny-v.safetensors");
    write_random_single_file(&file, &configs, true, 11).unwrap();
    // A1111-style sidecar: parameterization "v"
    std::fs::write(
        d.join("tiny-v.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n",
    )
    .unwrap();
    let folder =
        StableDiffusion::load(d.join("folder").to_str().unwrap(), &load_options()).unwrap();
    let sf = StableDiffusion::load(file.to_str().unwrap(), &load_options()).unwrap();
    assert_eq!(folder.scheduler.prediction_type, "v_prediction");
    assert_eq!(
        sf.scheduler.prediction_type, "v_prediction",
        "from the sidecar YAML"
    );
    assert_eq!(folder.fingerprint, sf.fingerprint);
    assert_eq!(sf.tokenizer.pad(), 0, "SD 2.x pads with `!`");
    assert_eq!(
        folder.tokenizer.encode_padded("a cat").ids,
        sf.tokenizer.encode_padded("a cat").ids
    );
    let (e1, t1, i1) = outputs(&folder);
    let (e2, t2, i2) = outputs(&sf);
    same_bits("UNet v", &e1, &e2);
    same_bits(
        "OpenCLIP text embeddings (penultimate layer + final norm)",
        &t1,
        &t2,
    );
    same_bits("VAE decoder", &i1, &i2);
}

#[test]
fn missing_and_extra_tensors_are_listed() {
    let d = tmp("finetune");
    let bytes = std::fs::read(single()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, view) in st.tensors() {
        if name.ends_with("out.2.bias") || name.contains("input_blocks.4.1.proj_out") {
            continue; // missing in the "fine-tune"
        }
        tensors.push((
            name.clone(),
            candle_core::safetensors::Load::load(&view, &Device::Cpu).unwrap(),
        ));
    }
    tensors.push((
        "lora_unet_extra.alpha".into(),
        Tensor::ones(1, DType::F32, &Device::Cpu).unwrap(),
    ));
    let path = d.join("finetune.safetensors");
    safetensors::tensor::serialize_to_file(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        None,
        &path,
    )
    .unwrap();
    let err = match StableDiffusion::load(path.to_str().unwrap(), &load_options()) {
        Ok(_) => panic!("a checkpoint with missing tensors must not load"),
        Err(e) => e.to_string(),
    };
    eprintln!("{err}");
    assert!(
        err.contains("3 tensors")
            && err.contains("missing `conv_out.bias`")
            && err.contains("proj_out.weight"),
        "{err}"
    );
    let shapes = single_file::read_shapes(&path).unwrap();
    let det = single_file::detect(&single_file::read_shapes(&single()).unwrap()).unwrap();
    assert_eq!(
        single_file::unclaimed_keys(&shapes, &det),
        vec!["lora_unet_extra.alpha".to_string()]
    );
}

#[test]
fn pickle_checkpoints_are_refused() {
    let d = tmp("pickle");
    let p = d.join("model.ckpt");
    std::fs::write(&p, b"PK\x03\x04 pickle").unwrap();
    let err = StableDiffusion::load(p.to_str().unwrap(), &load_options())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("safetensors") && err.contains("model.ckpt"),
        "{err}"
    );
}

/// `*.fp16.safetensors` variants load (converted to f32), with the same fingerprint.
#[test]
fn fp16_variant_files_load() {
    let d = tmp("fp16");
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        for e in std::fs::read_dir(tiny_model().join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".safetensors") {
                let ts = candle_core::safetensors::load(e.path(), &Device::Cpu).unwrap();
                let half: Vec<(String, Tensor)> = ts
                    .into_iter()
                    .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
                    .collect();
                let out = d.join(sub).join(format!("{stem}.fp16.safetensors"));
                safetensors::tensor::serialize_to_file(
                    half.iter().map(|(k, t)| (k.as_str(), t)),
                    None,
                    &out,
                )
                .unwrap();
            } else {
                std::fs::copy(e.path(), d.join(sub).join(&name)).unwrap();
            }
        }
    }
    std::fs::copy(
        tiny_model().join("model_index.json"),
        d.join("model_index.json"),
    )
    .unwrap();
    let half = StableDiffusion::load(d.to_str().unwrap(), &load_options()).unwrap();
    let full = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    assert_eq!(
        half.fingerprint, "f99da5222da910ce",
        "the fingerprint hashes f16 values"
    );
    let (e1, _, _) = outputs(&full);
    let (e2, _, _) = outputs(&half);
    let err = max_err(&e1, &e2);
    eprintln!("UNet ε, f16 weights vs f32 weights: max|difference| = {err:.2e}");
    assert!(err > 0.0 && err < 1e-2 * (1.0 + max_abs(&e1)));
}
