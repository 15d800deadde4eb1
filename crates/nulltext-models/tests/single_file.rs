//! Single-file checkpoints (original CompVis/A1111 layout): the fixture written by
//! diffusers' own conversion script, and SD 2.x-shaped (OpenCLIP, v-prediction) and
//! SDXL-shaped random models written in both layouts by nulltext's random-model tool.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use nulltext_models::random::{write_random_model, write_random_single_file, Preset};
use nulltext_models::sdxl::Family;
use nulltext_models::single_file;
use nulltext_models::{LoadOptions, NoControl, PromptEmbeds, StableDiffusion};

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

/// The tiny SDXL preset written with the same seed as a diffusers folder and as an A1111
/// single file (`conditioner.embedders.*`).
fn sdxl_pair(name: &str) -> (PathBuf, PathBuf) {
    let d = tmp(name);
    let configs = Preset::TinySdxl.configs();
    write_random_model(&d.join("folder"), &configs, 7, false).unwrap();
    let file = d.join("tiny-sdxl.safetensors");
    write_random_single_file(&file, &configs, false, 7).unwrap();
    (d.join("folder"), file)
}

#[test]
fn sdxl_single_file_loads_identically_to_the_folder() {
    let (dir, file) = sdxl_pair("sdxl");
    let folder = StableDiffusion::load(dir.to_str().unwrap(), &load_options()).unwrap();
    let opts = LoadOptions {
        config_dir: Some(dir.clone()),
        ..load_options()
    };
    let sf = StableDiffusion::load(file.to_str().unwrap(), &opts).unwrap();
    assert_eq!(sf.family(), Family::Sdxl);
    assert_eq!(sf.family().name(), "SDXL");
    assert!(sf.zeros_for_empty_prompt);
    assert_eq!(folder.fingerprint, sf.fingerprint);
    let (t1, t2) = (&folder.text_encoder_2, &sf.text_encoder_2);
    let (t1, t2) = (t1.as_ref().unwrap(), t2.as_ref().unwrap());
    assert_eq!(t2.tokenizer.pad(), 0, "the second tokenizer pads with `!`");
    let ids = |t: &nulltext_models::ClipTokenizer| t.encode_padded("a cat!!").ids;
    assert_eq!(ids(&t1.tokenizer), ids(&t2.tokenizer));
    assert_eq!(ids(&folder.tokenizer), ids(&sf.tokenizer));

    let prompts = ["a close up photo of a cat", ""];
    let e1 = folder.encode_prompts(&prompts).unwrap().0;
    let e2 = sf.encode_prompts(&prompts).unwrap().0;
    same_bits("context (both text encoders)", &e1.context, &e2.context);
    same_bits(
        "pooled embedding (OpenCLIP's text_projection)",
        e1.pooled.as_ref().unwrap(),
        e2.pooled.as_ref().unwrap(),
    );
    let x = on_device(&golden("unet_eps.safetensors")["x"].i(0..1).unwrap());
    let row = |e: &PromptEmbeds| PromptEmbeds {
        context: e.context.i(0..1).unwrap(),
        pooled: e.pooled.as_ref().map(|p| p.i(0..1).unwrap()),
    };
    let eps = |sd: &StableDiffusion, e: &PromptEmbeds| {
        sd.predict(&x, 501.0, &row(e), &mut NoControl, 0).unwrap()
    };
    same_bits(
        "UNet ε with text/time conditioning",
        &eps(&folder, &e1),
        &eps(&sf, &e2),
    );
    let decode = |sd: &StableDiffusion| sd.latent_to_image(&x).unwrap();
    same_bits("VAE decoder", &decode(&folder), &decode(&sf));
}

#[test]
fn sdxl_architecture_is_read_off_the_shapes() {
    let (_, file) = sdxl_pair("sdxl-detect");
    let shapes = single_file::read_shapes(&file).unwrap();
    let d = single_file::detect(&shapes).unwrap();
    assert_eq!(Family::of(&d.unet), Family::Sdxl);
    assert_eq!(d.unet.block_out_channels, vec![16, 32, 48]);
    assert_eq!(
        d.unet.down_block_types,
        [
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D"
        ]
    );
    assert_eq!(
        d.unet.up_block_types,
        ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    );
    assert_eq!(
        single_file::per_block(&d.unet.transformer_layers_per_block),
        [1, 1, 2]
    );
    assert_eq!(d.layers_per_block, 2);
    assert!(d.unet.use_linear_projection);
    assert_eq!(d.unet.cross_attention_dim, 24);
    let tt = d.unet.text_time().expect("SDXL's added conditioning");
    assert_eq!(tt.text, 12);
    assert_eq!(d.unet.addition_time_embed_dim, Some(8));
    assert_eq!(d.vae.scaling_factor, 0.13025);
    assert_eq!(d.vae.block_out_channels, vec![16, 16, 32, 32]);
    assert!(!d.openclip);
    assert_eq!((d.text.hidden_size, d.text.num_hidden_layers), (8, 3));
    assert_eq!(d.text.hidden_act, "quick_gelu");
    let t2 = d.text_2.as_ref().expect("the second text encoder");
    assert_eq!(
        (t2.hidden_size, t2.num_hidden_layers, t2.intermediate_size),
        (16, 3, 64)
    );
    assert_eq!(
        (t2.hidden_act.as_str(), t2.projection_dim),
        ("gelu", Some(12))
    );
    assert!(single_file::unclaimed_keys(&shapes, &d).is_empty());
}

/// The header of a full-size SDXL base single file (the preset's shapes, no values): what
/// detection reads off `sd_xl_base_1.0.safetensors`.
#[test]
fn sdxl_base_shapes_give_its_architecture() {
    let configs = Preset::Sdxl.configs();
    let shapes = nulltext_models::random::single_file_shapes(&configs, false).unwrap();
    let d = single_file::detect(&shapes).unwrap();
    assert_eq!(Family::of(&d.unet), Family::Sdxl);
    assert_eq!(d.unet.block_out_channels, vec![320, 640, 1280]);
    assert_eq!(
        single_file::per_block(&d.unet.attention_head_dim),
        [5, 10, 20]
    );
    assert_eq!(
        single_file::per_block(&d.unet.transformer_layers_per_block),
        [1, 2, 10]
    );
    assert_eq!(d.unet.cross_attention_dim, 2048);
    assert_eq!(d.unet.addition_time_embed_dim, Some(256));
    assert_eq!(d.unet.projection_class_embeddings_input_dim, Some(2816));
    assert_eq!(d.unet.sample_size, 128);
    let t2 = d.text_2.as_ref().unwrap();
    assert_eq!(
        (t2.hidden_size, t2.num_hidden_layers, t2.num_attention_heads),
        (1280, 32, 20)
    );
    assert_eq!(t2.projection_dim, Some(1280));
    assert_eq!(
        (
            d.text.hidden_size,
            d.text.num_hidden_layers,
            d.text.num_attention_heads
        ),
        (768, 12, 12)
    );
    assert_eq!(d.vae.block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(d.vae.scaling_factor, 0.13025);
    assert!(single_file::unclaimed_keys(&shapes, &d).is_empty());
    // the detected UNet needs exactly the file's UNet tensors
    let lists = nulltext_models::tensors::tensor_lists(&d.unet, &d.vae, &d.text).unwrap();
    let in_file = shapes
        .keys()
        .filter(|k| k.starts_with(single_file::UNET_PREFIX))
        .count();
    assert_eq!(lists[0].1.len(), in_file);
}

/// `file`'s tensors, renamed or replaced by `edit` (`None` drops one), written to `out`.
fn rewrite(
    file: &std::path::Path,
    out: &std::path::Path,
    edit: impl Fn(&str, Tensor) -> Option<(String, Tensor)>,
) {
    let tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| edit(&k, t))
        .collect();
    safetensors::tensor::serialize_to_file(tensors.iter().map(|(k, t)| (k.as_str(), t)), None, out)
        .unwrap();
}

fn load_err(path: &std::path::Path) -> String {
    match StableDiffusion::load(path.to_str().unwrap(), &load_options()) {
        Ok(_) => panic!("{} must not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sdxl_refiner_and_inpainting_single_files_are_refused() {
    let (_, file) = sdxl_pair("sdxl-refuse");
    let d = file.parent().unwrap();
    // a refiner holds only OpenCLIP ViT-bigG, as `conditioner.embedders.0.model.*`
    let refiner = d.join("refiner.safetensors");
    rewrite(&file, &refiner, |k, t| {
        if k.starts_with(single_file::SDXL_CLIP_PREFIX) {
            return None;
        }
        let k = k.replace(
            single_file::SDXL_OPENCLIP_PREFIX,
            "conditioner.embedders.0.model.",
        );
        Some((k, t))
    });
    let err = load_err(&refiner);
    assert!(
        err.contains("SDXL refiner") && err.contains("refiner.safetensors"),
        "{err}"
    );
    // an inpainting UNet takes 9 channels: latent, mask and masked image
    let inpaint = d.join("inpainting.safetensors");
    let first = format!("{}input_blocks.0.0.weight", single_file::UNET_PREFIX);
    rewrite(&file, &inpaint, |k, t| {
        let t = match k == first {
            true => Tensor::zeros((16, 9, 3, 3), DType::F32, &Device::Cpu).unwrap(),
            false => t,
        };
        Some((k.to_string(), t))
    });
    let err = load_err(&inpaint);
    assert!(
        err.contains("inpainting model") && err.contains("inpainting.safetensors"),
        "{err}"
    );
}
