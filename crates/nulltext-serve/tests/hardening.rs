//! The server against requests made to exhaust it: huge forms, image bombs, uploads to a
//! full queue, endless new words; each is refused quickly with nothing written, and resident
//! memory stays bounded (measured before and after, as the load test does). Plus a bounded,
//! deterministic mutation run over the request parsers.

mod common;
#[path = "../../../tests/support/crafted_png.rs"]
mod crafted_png;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::*;
use nulltext_serve::params::{invert_params, EditRequest, Limits};
use serde_json::{json, Value};

/// An all-black PNG of `w`×`h`: a few hundred KB that decode to `3·w·h` bytes.
fn black_png(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::GrayImage::new(w, h)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// Peak resident memory of this process in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn forms_images_and_sizes_are_refused_up_front() {
    let dir = temp_dir("harden-forms");
    let server = start(nulltext_serve::ServeArgs {
        max_size: 128,
        ..args(&dir)
    });
    let addr = server.addr();
    let before = tree(&dir);

    // A form of 150,000 fields is refused at its 33rd, and /v1/info answers meanwhile.
    let names: Vec<String> = (0..150_000).map(|i| format!("f{i}")).collect();
    let parts: Vec<Part> = names.iter().map(|n| Part::Text(n, "1")).collect();
    let body = multipart(&parts);
    assert!(body.len() > 8 << 20 && body.len() < 32 << 20);
    let ctype = format!("multipart/form-data; boundary={BOUNDARY}");
    let t = Instant::now();
    let poller = std::thread::spawn(move || {
        let start = Instant::now();
        let mut worst = Duration::ZERO;
        while start.elapsed() < Duration::from_millis(1500) {
            let t = Instant::now();
            assert_eq!(get(addr, "/v1/info").status, 200);
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        worst
    });
    let r = try_request(
        addr,
        "POST",
        "/v1/inversions",
        &[("Content-Type", &ctype)],
        &body,
    );
    let took = t.elapsed();
    if let Ok(r) = r {
        assert_eq!(r.status, 400);
        assert!(r.message().contains("more than 32 fields"));
    }
    let worst = poller.join().unwrap();
    eprintln!("150k-field form answered in {took:?}; slowest /v1/info meanwhile {worst:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");

    // A PNG whose header claims 60000×60000 pixels: 413, nothing decoded.
    let bomb = crafted_png::claiming(black_png(4, 4), 60_000, 60_000);
    let form = cat_form(&bomb, &[Part::Text("size", "64")]);
    let r = post_multipart(addr, "/v1/inversions", &form);
    assert_eq!((r.status, r.error_code().as_str()), (413, "too_large"));
    assert!(r.message().contains("60000×60000"));

    // No size field: the model's own (256) obeys --max-size 128 as an asked-for one does.
    let png = chelsea_png();
    let r = post_multipart(addr, "/v1/inversions", &cat_form(&png, &[]));
    assert_eq!(r.status, 400);
    let m = r.message();
    assert!(
        m.contains("the model's sample size is 256") && m.contains("128"),
        "{m}"
    );
    // Steps the scheduler cannot take.
    let form = cat_form(
        &png,
        &[Part::Text("size", "64"), Part::Text("steps", "1000")],
    );
    let r = post_multipart(addr, "/v1/inversions", &form);
    assert_eq!(r.status, 400);
    let m = r.message();
    assert!(m.contains("between 1 and"), "{m}");

    // The page may not be framed by another site.
    let r = get(addr, "/");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("frame-ancestors 'none'"));

    assert_eq!(before, tree(&dir), "a refused request wrote something");
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_queue_answers_before_decoding_and_memory_stays_bounded() {
    let dir = temp_dir("harden-queue");
    let server = start(nulltext_serve::ServeArgs {
        queue: 1,
        ..args(&dir)
    });
    let addr = server.addr();
    let long = job_id(&submit_inversion(addr, "50", "10"));
    wait_job(addr, &long, 60, |v| v["state"] == "running");
    let queued = job_id(&submit_inversion(addr, "4", "2"));

    // Four concurrent 36 MP uploads (all black: ~100 KB each) to the full queue.
    let big = std::sync::Arc::new(black_png(6000, 6000));
    eprintln!("36 MP black PNG: {} bytes", big.len());
    let (before, peak_before) = (rss_kib(), peak_rss_kib());
    let t = Instant::now();
    let uploads: Vec<_> = (0..4)
        .map(|_| {
            let big = big.clone();
            std::thread::spawn(move || {
                let form = cat_form(&big, &[Part::Text("size", "64")]);
                let r = post_multipart(addr, "/v1/inversions", &form);
                (r.status, r.error_code())
            })
        })
        .collect();
    for u in uploads {
        assert_eq!(u.join().unwrap(), (429, "queue_full".to_string()));
    }
    let took = t.elapsed();
    let (after, peak_after) = (rss_kib(), peak_rss_kib());
    eprintln!(
        "4 uploads to a full queue: 429 in {took:?}; RSS {before} KiB → {after} KiB, \
         peak {peak_before} KiB → {peak_after} KiB"
    );
    // One decoded upload alone would be 108 MB.
    assert!(
        peak_after < peak_before + 48 * 1024,
        "peak {peak_before} → {peak_after} KiB"
    );
    assert!(after < before + 48 * 1024, "RSS {before} KiB → {after} KiB");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // SDEdit starting after the last step is refused when asked, not in the worker.
    for id in [&queued, &long] {
        cancel(addr, id);
    }
    wait_job(addr, &long, 60, is_terminal);
    let inv = submit_inversion(addr, "2", "1");
    let v = wait_job(addr, &job_id(&inv), 120, is_terminal);
    assert_eq!(v["state"], "succeeded", "{v}");
    let inv_id = v["inversion_id"].as_str().unwrap().to_string();
    let edits = format!("/v1/inversions/{inv_id}/edits");
    let r = post_json(addr, &edits, &json!({"targets": ["a dog"], "sdedit": 0.01}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.message().contains("sdedit 0.01"));

    // Edits full of new words (refused: the blend word is in no target) keep the
    // tokenizer's memory bounded.
    // Twelve letters, all distinct words.
    let word = |mut i: usize| {
        let mut w = String::from("q");
        for _ in 0..11 {
            w.push((b'a' + (i % 26) as u8) as char);
            i /= 26;
        }
        w
    };
    const REQUESTS: usize = 1000;
    const WORDS: usize = 75;
    let rounds = |from: usize| {
        for k in from..from + REQUESTS {
            let target: Vec<String> = (0..WORDS).map(|j| word(k * WORDS + j)).collect();
            let r = post_json(
                addr,
                &edits,
                &json!({"targets": [target.join(" ")], "blend": "cat:zebra"}),
            );
            assert_eq!(r.status, 400, "{}", r.text());
        }
    };
    rounds(0);
    let first = rss_kib();
    rounds(REQUESTS);
    let second = rss_kib();
    eprintln!("2 × {REQUESTS} edits of {WORDS} new words each: RSS {first} KiB → {second} KiB");
    assert!(second < first + 4 * 1024, "RSS {first} KiB → {second} KiB");
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn limits() -> Limits {
    Limits {
        max_body_bytes: 1 << 20,
        max_pixels: 1 << 20,
        max_prompt_chars: 200,
        max_targets: 4,
        max_steps: 200,
        max_inner_steps: 20,
        max_size: 512,
    }
}

/// Random fields and values for the inversion form, random JSON for the edit body: every
/// case is a value or a 4xx, never a panic.
#[test]
fn request_parsers_survive_mutations() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let names = [
        "prompt",
        "method",
        "steps",
        "inner_steps",
        "guidance",
        "early_stop",
        "size",
        "crop",
        "image",
        "",
        "x",
    ];
    let values = [
        "",
        " ",
        "a cat",
        "0",
        "1",
        "-1",
        "64",
        "72",
        "1e308",
        "NaN",
        "inf",
        "-0",
        "1,2,3,4",
        "4294967296",
        "18446744073709551616",
        "0.0001",
        "null-text",
        "ddim",
        "\u{0}",
        "😀",
        "1,1,1",
        ",,,",
        "9999999999,0,0,0",
    ];
    let edit_keys = [
        "targets",
        "mode",
        "cross_replace",
        "self_replace",
        "blend",
        "blend_threshold",
        "blend_subtract",
        "attention_downscale",
        "reweight",
        "sdedit",
        "attention_maps",
    ];
    let json_values = [
        json!(null),
        json!(0),
        json!(-1),
        json!(1e308),
        json!(0.5),
        json!(""),
        json!("cat:dog"),
        json!("0.1:0.8"),
        json!("0.8,cat=0.4"),
        json!("x=NaN"),
        json!(["a dog"]),
        json!([]),
        json!([""]),
        json!(true),
        json!(18446744073709551615u64),
        json!("2:1"),
        json!("a=1e400"),
        json!({"a": 1}),
        json!(":"),
        json!("cat:"),
        json!(["a", "b", "c", "d", "e"]),
    ];
    let l = limits();
    for case in 0..4000 {
        let n = (next() % 5) as usize;
        let fields: Vec<(String, String)> = (0..n)
            .map(|_| {
                let k = names[(next() % names.len() as u64) as usize];
                let v = values[(next() % values.len() as u64) as usize];
                (k.to_string(), v.to_string())
            })
            .collect();
        let r = catch_unwind(AssertUnwindSafe(|| invert_params(&fields, &l, 256)));
        match r {
            Ok(Ok(p)) => assert!(p.size <= 512 && p.options.num_steps <= 200),
            Ok(Err(e)) => assert!(e.status.is_client_error(), "{e}"),
            Err(_) => panic!("case {case}: invert_params panicked on {fields:?}"),
        }
        let mut body = serde_json::Map::new();
        for _ in 0..(next() % 5) {
            let k = edit_keys[(next() % edit_keys.len() as u64) as usize];
            let v = json_values[(next() % json_values.len() as u64) as usize].clone();
            body.insert(k.into(), v);
        }
        let body = Value::Object(body);
        let r = catch_unwind(AssertUnwindSafe(|| {
            serde_json::from_value::<EditRequest>(body.clone()).map(|req| req.options(&l))
        }));
        match r {
            Ok(Ok(Err(e))) => assert!(e.status.is_client_error(), "{e}"),
            Ok(_) => {}
            Err(_) => panic!("case {case}: edit parsing panicked on {body}"),
        }
    }
}
