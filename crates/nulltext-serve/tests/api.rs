//! The HTTP API over real loopback connections, with the tiny model: invert → edit →
//! download across a restart, refused requests that write nothing, the bounded queue,
//! cancellation, interrupted jobs, the OpenAPI document and a short load test.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn invert_edit_download_across_a_restart() {
    let dir = temp_dir("flow");
    let server = start(args(&dir));
    let addr = server.addr();
    // One server per data folder: a second one is refused and touches nothing.
    let before = tree(&dir);
    let e = nulltext_serve::Server::start(load_tiny(), args(&dir))
        .err()
        .expect("a second server on the same folder");
    assert!(
        format!("{e:#}").contains("in use by another nulltext serve"),
        "{e:#}"
    );
    assert_eq!(tree(&dir), before);

    let r = submit_inversion(addr, "4", "2");
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json();
    assert_eq!(job["kind"], "inversion");
    assert!(matches!(job["state"].as_str(), Some("queued" | "running")));
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );

    // Progress as server-sent events: stages, null-text iterations with their loss, the end.
    let events = read_events(addr, &id);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"state"), "{names:?}");
    let iterations: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "iteration")
        .map(|(_, v)| v)
        .collect();
    // 4 steps × 2 iterations, unless a step stopped early after its first.
    assert!((4..=8).contains(&iterations.len()), "{names:?}");
    assert!(iterations
        .iter()
        .all(|v| v["loss"].as_f64().unwrap() >= 0.0));
    assert!(events
        .iter()
        .any(|(n, v)| n == "progress" && v["stage"] == "null-text optimization"));
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "state");
    assert_eq!(done["state"], "succeeded", "{done}");

    let job = get(addr, &format!("/v1/jobs/{id}")).json();
    assert_eq!(job["state"], "succeeded");
    let inv = &job["result"];
    let inv_id = inv["id"].as_str().unwrap().to_string();
    assert_eq!(inv["prompt"], "a close up photo of a cat");
    assert_eq!(
        (inv["width"].as_u64(), inv["steps"].as_u64()),
        (Some(64), Some(4))
    );
    for key in ["input", "reconstruction"] {
        let r = get(addr, inv["urls"][key].as_str().unwrap());
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("image/png"));
        assert_eq!(png_size(&r.body), (64, 64));
    }
    // The download is a standard inversion file, as `nulltext edit --inversion` reads it.
    let r = get(addr, &format!("/v1/inversions/{inv_id}/file"));
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-disposition")
        .unwrap()
        .contains(".nti.safetensors"));
    let file = dir.join("downloaded.nti.safetensors");
    std::fs::write(&file, &r.body).unwrap();
    let loaded = nulltext::inversion_file::load(&file).unwrap();
    assert_eq!(loaded.prompt, "a close up photo of a cat");
    assert_eq!((loaded.num_steps, loaded.width), (4, 64));
    server.shutdown().unwrap();

    // A new server on the same data directory has it all.
    let server = start(args(&dir));
    let addr = server.addr();
    let r = get(addr, &format!("/v1/inversions/{inv_id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["prompt"], "a close up photo of a cat");
    let list = get(addr, "/v1/inversions").json();
    assert_eq!(list["inversions"][0]["id"], inv_id.as_str());
    assert_eq!(
        get(addr, &format!("/v1/jobs/{id}")).json()["state"],
        "succeeded"
    );

    // Edits are checked against the prompts before they are queued.
    let edits = format!("/v1/inversions/{inv_id}/edits");
    for (body, code, needle) in [
        (json!({"targets": []}), 400, "at least one"),
        (
            json!({"targets": ["a close up photo of a dog"], "blend": "cat:tiger"}),
            400,
            "tiger",
        ),
        (
            json!({"targets": ["a dog"], "mode": "replace"}),
            400,
            "as many words",
        ),
        (
            json!({"targets": ["a dog"], "path": "/etc/passwd"}),
            422,
            "unknown field",
        ),
        (json!({"targets": vec!["a dog"; 9]}), 400, "at most 8"),
        (json!({"targets": ["a dog".repeat(20_000)]}), 413, "limit"),
    ] {
        let r = post_json(addr, &edits, &body);
        assert_eq!(r.status, code, "{body}: {}", r.text());
        let m = r.message();
        assert!(m.contains(needle), "{m}");
    }

    let r = post_json(
        addr,
        &format!("{edits}?wait=true"),
        &json!({
            "targets": ["a close up photo of a dog", "a close up photo of a tiger"],
            "cross_replace": 0.8,
            "self_replace": "0.5",
            "blend": "cat:dog tiger",
            "reweight": "dog=2",
            "attention_maps": true,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let job = r.json();
    assert_eq!(job["state"], "succeeded", "{job}");
    let edit = &job["result"];
    assert_eq!(edit["mode"], "replace");
    let images = edit["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    assert_eq!(images[1]["prompt"], "a close up photo of a dog");
    for img in images
        .iter()
        .chain(edit["attention_maps"].as_array().unwrap())
    {
        let r = get(addr, img["url"].as_str().unwrap());
        assert_eq!(r.status, 200, "{img}");
        assert!(png_size(&r.body).0 > 0);
    }
    assert_eq!(edit["attention_maps"].as_array().unwrap().len(), 3);
    let edit_id = edit["id"].as_str().unwrap();
    let stored = dir.join(format!("inversions/{inv_id}/edits/{edit_id}/target-2.png"));
    assert!(stored.is_file());
    assert_eq!(get(addr, &edits).json()["edits"][0]["id"], edit_id);
    // Only the files an edit wrote are served.
    let r = get(addr, &format!("{edits}/{edit_id}/images/edit.json"));
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An SDXL model serves the same API: an inversion whose file keeps the pooled embeddings,
/// and an edit with a blend word.
#[test]
fn an_sdxl_model_serves_the_same_api() {
    let dir = temp_dir("sdxl");
    let server = nulltext_serve::Server::start(load_tiny_sdxl(), args(&dir)).unwrap();
    let addr = server.addr();
    let info = get(addr, "/v1/info").json();
    assert_eq!(info["model"]["family"], "SDXL", "{info}");
    let r = submit_inversion(addr, "3", "2");
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = wait_job(addr, &id, 300, |v| {
        v["state"] != "queued" && v["state"] != "running"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    let inv_id = job["result"]["id"].as_str().unwrap().to_string();
    let r = get(addr, &format!("/v1/inversions/{inv_id}/file"));
    assert_eq!(r.status, 200);
    let file = dir.join("downloaded.nti.safetensors");
    std::fs::write(&file, &r.body).unwrap();
    let loaded = nulltext::inversion_file::load(&file).unwrap();
    assert_eq!(loaded.null_pooled.as_ref().map(|p| p.dims()[0]), Some(3));

    let r = post_json(
        addr,
        &format!("/v1/inversions/{inv_id}/edits?wait=true"),
        &json!({"targets": ["a close up photo of a tiger"], "blend": "cat:tiger"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let job = r.json();
    assert_eq!(job["state"], "succeeded", "{job}");
    for img in job["result"]["images"].as_array().unwrap() {
        let r = get(addr, img["url"].as_str().unwrap());
        assert_eq!((r.status, png_size(&r.body)), (200, (64, 64)), "{img}");
    }
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_requests_write_nothing() {
    let dir = temp_dir("refused");
    let server = start(nulltext_serve::ServeArgs {
        max_megapixels: 0.01,
        max_prompt_chars: 50,
        ..args(&dir)
    });
    let addr = server.addr();
    let before = tree(&dir);
    let png = chelsea_png();
    let mp = format!("multipart/form-data; boundary={BOUNDARY}");

    // 50 MB, over the 32 MiB limit: refused before it is read (the client may still be
    // sending it; the answer arrives all the same).
    let junk = vec![b'x'; 50_000_000];
    let big = multipart(&[
        Part::Text("prompt", "a cat"),
        Part::File("image", "huge.png", "image/png", &junk),
    ]);
    let r = request(
        addr,
        "POST",
        "/v1/inversions",
        &[("Content-Type", &mp)],
        &big,
    );
    assert_eq!((r.status, r.error_code().as_str()), (413, "too_large"));
    let r = request(
        addr,
        "POST",
        "/v1/inversions",
        &[("Content-Type", &mp), ("Expect", "100-continue")],
        &big,
    );
    assert_eq!(r.status, 413);
    // Without a declared length (chunked), the limit holds while reading.
    let mut chunked = Vec::new();
    for c in big.chunks(1 << 20) {
        chunked.extend(format!("{:x}\r\n", c.len()).as_bytes());
        chunked.extend(c);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let r = try_request(
        addr,
        "POST",
        "/v1/inversions",
        &[("Content-Type", &mp), ("Transfer-Encoding", "chunked")],
        &chunked,
    );
    match r {
        Ok(r) => assert_eq!(r.status, 413),
        // The server may close a connection whose body it stopped reading; still refused.
        Err(e) => eprintln!("chunked upload: {e}"),
    }

    let long_caption = "a very long caption ".repeat(10);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        // A text file named .png.
        (
            multipart(&cat_form(b"this is not an image\n", &[])),
            415,
            "unsupported_media_type",
        ),
        // 256×256 pixels over a limit of 10,000.
        (multipart(&cat_form(&png, &[])), 413, "too_large"),
        (
            multipart(&[Part::Text("prompt", "a cat")]),
            400,
            "bad_request",
        ),
        (
            multipart(&[
                Part::File("image", "cat.png", "image/png", &png),
                Part::Text("prompt", &long_caption),
            ]),
            400,
            "bad_request",
        ),
        (
            multipart(&cat_form(&png, &[Part::Text("data_dir", "/tmp")])),
            400,
            "bad_request",
        ),
        (
            multipart(&cat_form(&png, &[Part::Text("steps", "100000")])),
            400,
            "bad_request",
        ),
        (b"--not-a-multipart-body".to_vec(), 400, "bad_request"),
    ];
    for (k, (body, status, code)) in cases.iter().enumerate() {
        let r = request(
            addr,
            "POST",
            "/v1/inversions",
            &[("Content-Type", &mp)],
            body,
        );
        assert_eq!(r.status, *status, "case {k}: {}", r.text());
        assert_eq!(r.error_code(), *code, "case {k}");
    }
    let r = request(
        addr,
        "POST",
        "/v1/inversions",
        &[("Content-Type", "text/plain")],
        b"x",
    );
    assert!(r.status >= 400 && r.status < 500);
    r.error_code();

    // Path-like and malformed ids never reach the file system.
    let unknown = "0123456789abcdef0123456789abcdef";
    for (method, path, status) in [
        ("GET", "/v1/jobs/..%2F..%2F..%2Fetc%2Fpasswd", 400),
        ("GET", "/v1/jobs/../../etc/passwd", 404),
        ("GET", "/v1/inversions/..%2Finversions", 400),
        ("GET", "/v1/inversions/%2e%2e/file", 400),
        (
            "GET",
            "/v1/inversions/0123456789ABCDEF0123456789ABCDEF",
            400,
        ),
        ("POST", "/v1/inversions/..%2F..%2Ftmp/edits", 400),
        ("POST", "/v1/jobs/..%2Fjobs/cancel", 400),
        ("DELETE", "/v1/inversions/..%2F..", 400),
        (
            "GET",
            &format!("/v1/inversions/{unknown}/images/..%2F..%2Fjobs"),
            404,
        ),
        (
            "GET",
            &format!("/v1/inversions/{unknown}/edits/..%2F..%2F/images/x.png"),
            404,
        ),
        ("GET", &format!("/v1/inversions/{unknown}"), 404),
        ("GET", &format!("/v1/jobs/{unknown}/events"), 404),
    ] {
        let r = request(
            addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            b"{\"targets\":[\"a\"]}",
        );
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        let code = r.error_code();
        assert!(
            ["invalid_id", "not_found", "no_route"].contains(&code.as_str()),
            "{code}"
        );
    }
    // Unknown routes and methods answer JSON too.
    let r = get(addr, "/v1/nothing-here");
    assert_eq!((r.status, r.error_code().as_str()), (404, "no_route"));
    let r = request(addr, "PUT", "/v1/jobs", &[], b"");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (405, "method_not_allowed")
    );

    // Other sites cannot drive the service through a browser, nor reach it by DNS rebinding.
    let r = request(
        addr,
        "POST",
        "/v1/inversions",
        &[("Content-Type", &mp), ("Origin", "http://evil.example")],
        &multipart(&cat_form(&png, &[])),
    );
    assert_eq!((r.status, r.error_code().as_str()), (403, "forbidden"));
    let r = request(
        addr,
        "GET",
        "/v1/inversions",
        &[("Host", "evil.example:7860")],
        b"",
    );
    assert_eq!((r.status, r.error_code().as_str()), (403, "forbidden"));

    assert_eq!(tree(&dir), before, "a refused request wrote something");
    assert!(get(addr, "/v1/jobs").json()["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn full_queue_cancellation_and_interrupted_jobs() {
    let dir = temp_dir("queue");
    let server = start(nulltext_serve::ServeArgs {
        queue: 1,
        ..args(&dir)
    });
    let addr = server.addr();
    // A long job (50 steps × 10 iterations) holds the worker.
    let long = job_id(&submit_inversion(addr, "50", "10"));
    wait_job(addr, &long, 60, |v| v["state"] == "running");
    let r = submit_inversion(addr, "4", "2");
    assert_eq!(r.status, 202);
    let queued = r.json();
    assert_eq!(
        (queued["state"].as_str(), queued["queue_position"].as_u64()),
        (Some("queued"), Some(0))
    );
    let queued = queued["id"].as_str().unwrap().to_string();

    let r = submit_inversion(addr, "4", "2");
    assert_eq!((r.status, r.error_code().as_str()), (429, "queue_full"));
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry));

    // Cancelling: a queued job at once, the running one at its next iteration.
    let r = cancel(addr, &queued);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "cancelled");
    assert_eq!(cancel(addr, &long).status, 200);
    let v = wait_job(addr, &long, 60, is_terminal);
    assert_eq!(v["state"], "cancelled", "{v}");
    let r = cancel(addr, &long);
    assert_eq!((r.status, r.error_code().as_str()), (409, "conflict"));

    // A shutdown in the middle of a job marks it failed, and nothing half-written stays.
    let cut = job_id(&submit_inversion(addr, "50", "10"));
    wait_job(addr, &cut, 60, |v| v["state"] == "running");
    let t = Instant::now();
    server.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(30));
    // A record left "running" by a crash.
    let crashed = "00000000000000000000000000c0ffee";
    let mut rec: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("jobs/{cut}.json"))).unwrap())
            .unwrap();
    assert_eq!(rec["state"], "failed");
    rec["id"] = json!(crashed);
    rec["state"] = json!("running");
    rec["error"] = Value::Null;
    std::fs::write(dir.join(format!("jobs/{crashed}.json")), rec.to_string()).unwrap();
    std::fs::create_dir_all(dir.join("tmp/leftover")).unwrap();
    std::fs::write(
        dir.join("tmp/leftover/inversion.nti.safetensors"),
        b"partial",
    )
    .unwrap();

    let server = start(args(&dir));
    let addr = server.addr();
    for (id, state) in [
        (&long, "cancelled"),
        (&queued, "cancelled"),
        (&cut.as_str().to_string(), "failed"),
    ] {
        assert_eq!(get(addr, &format!("/v1/jobs/{id}")).json()["state"], state);
    }
    let v = get(addr, &format!("/v1/jobs/{crashed}")).json();
    assert_eq!(v["state"], "failed");
    assert!(v["error"].as_str().unwrap().contains("interrupted"), "{v}");
    assert!(get(addr, "/v1/inversions").json()["inversions"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(dir.join("inversions")).unwrap().count(),
        0
    );
    // Events of a finished job: its record, then the end of the stream.
    let events = read_events(addr, crashed);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["state"], "failed");
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn openapi_describes_the_routes_and_the_page_is_self_contained() {
    let dir = temp_dir("openapi");
    let server = start(args(&dir));
    let addr = server.addr();
    let r = get(addr, "/openapi.json");
    assert_eq!(r.status, 200);
    let spec = r.json();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
    let paths = spec["paths"].as_object().unwrap();
    let id = "0123456789abcdef0123456789abcdef";
    let mut n = 0;
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            if !["get", "post", "delete"].contains(&method.as_str()) {
                continue;
            }
            let p = path
                .replace("{id}", id)
                .replace("{edit}", id)
                .replace("{name}", "input.png");
            let r = request(
                addr,
                &method.to_uppercase(),
                &p,
                &[("Content-Type", "application/json")],
                b"{}",
            );
            assert!(r.status != 405, "{method} {path}: {}", r.status);
            if r.status >= 400 {
                assert_ne!(r.error_code(), "no_route", "{method} {path} is not served");
            }
            n += 1;
        }
    }
    assert!(n >= 15, "{n} operations documented");
    for p in [
        "/v1/info",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/cancel",
        "/v1/inversions",
        "/v1/inversions/{id}",
        "/v1/inversions/{id}/file",
        "/v1/inversions/{id}/images/{name}",
        "/v1/inversions/{id}/edits",
        "/v1/inversions/{id}/edits/{edit}",
        "/v1/inversions/{id}/edits/{edit}/images/{name}",
    ] {
        assert!(paths.contains_key(p), "{p} is not documented");
    }
    let info = get(addr, "/v1/info").json();
    assert_eq!(info["model"]["default_size"], 256);
    assert_eq!(info["queue"]["capacity"], 16);

    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("/v1/inversions"));
    for external in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "url(http",
        "@import",
        "//cdn",
    ] {
        assert!(
            !html.contains(external),
            "the page loads something from elsewhere: {external}"
        );
    }
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// 50 clients follow one job (half poll its status, half read its events) while it runs:
/// no request fails, and memory does not grow from one round to the next.
#[test]
fn load_fifty_clients_while_a_job_runs() {
    let dir = temp_dir("load");
    let server = start(args(&dir));
    let addr = server.addr();
    let round = |steps: &str| -> (usize, usize, usize) {
        let id = job_id(&submit_inversion(addr, steps, "4"));
        let handles: Vec<_> = (0..50)
            .map(|k| {
                let id = id.clone();
                std::thread::spawn(move || -> (usize, usize) {
                    if k % 2 == 0 {
                        let events = read_events(addr, &id);
                        let ok = events
                            .last()
                            .is_some_and(|(n, v)| n == "state" && v["state"] == "succeeded");
                        (events.len(), usize::from(!ok))
                    } else {
                        let (mut n, mut errors) = (0, 0);
                        let start = Instant::now();
                        loop {
                            match try_request(addr, "GET", &format!("/v1/jobs/{id}"), &[], b"") {
                                Ok(r) if r.status == 200 => {
                                    n += 1;
                                    if is_terminal(&r.json()) {
                                        break;
                                    }
                                }
                                _ => errors += 1,
                            }
                            if start.elapsed() > Duration::from_secs(90) {
                                errors += 1;
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(25));
                        }
                        (n, errors)
                    }
                })
            })
            .collect();
        let (mut events, mut polls, mut errors) = (0, 0, 0);
        for (k, h) in handles.into_iter().enumerate() {
            let (n, e) = h.join().unwrap();
            if k % 2 == 0 {
                events += n;
            } else {
                polls += n;
            }
            errors += e;
        }
        (events, polls, errors)
    };
    let before = rss_kib();
    let (e1, p1, err1) = round("8");
    let after_first = rss_kib();
    let (e2, p2, err2) = round("8");
    let after_second = rss_kib();
    eprintln!(
        "load: 50 clients × 2 rounds; events {e1}+{e2}, status polls {p1}+{p2}, errors {}; \
         RSS {before} KiB → {after_first} KiB → {after_second} KiB",
        err1 + err2
    );
    assert_eq!(err1 + err2, 0);
    // Every stream saw more than the job's final state.
    assert!(e1 > 25 * 5 && e2 > 25 * 5, "too few events: {e1}, {e2}");
    assert!(
        after_second <= after_first + 32 * 1024,
        "memory grew by {} KiB in the second round",
        after_second.saturating_sub(after_first)
    );
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
