//! The page in headless Chromium (Debian's `chromium` package), driven over the DevTools
//! protocol: with the bundled shapes model, upload a scene, invert it, edit it, and see the
//! edited images and the words' attention maps appear.
//! `NULLTEXT_SCREENSHOT=docs/serve.png` (relative to the repository root) also saves a
//! screenshot of the finished page there.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// `$NULLTEXT_CHROMIUM`, else the first of chromium, chromium-browser, google-chrome on
/// the PATH.
fn chromium_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NULLTEXT_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "this test needs headless Chromium, which was not found: install Debian's `chromium` \
         package (apt-get install -y chromium; .ci/run does) or point NULLTEXT_CHROMIUM at a \
         Chromium binary"
    );
}

struct Browser {
    child: Child,
    _profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

/// Starts headless Chromium with its DevTools endpoint on a free loopback port; it
/// resolves no host name and does no background networking.
fn launch(profile: &Path) -> (Browser, SocketAddr) {
    let mut child = Command::new(chromium_binary())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--no-pings",
            "--metrics-recording-only",
            "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium_binary().display()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let browser = Browser {
        child,
        _profile: profile.to_path_buf(),
    };
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("Chromium did not open its DevTools endpoint within 60 s");
    // ws://127.0.0.1:PORT/devtools/browser/…
    let hostport = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    (browser, hostport.parse().unwrap())
}

/// A DevTools protocol session with one page.
struct Cdp {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Cdp {
    fn connect(devtools: SocketAddr) -> Self {
        let list = get(devtools, "/json/list").json();
        let page = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("Chromium has no page");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (ws, _) = tungstenite::connect(url).expect("DevTools websocket");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        Self { ws, next: 1 }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws.send(Message::Text(msg.to_string().into())).unwrap();
        loop {
            let m = self.ws.read().unwrap_or_else(|e| panic!("{method}: {e}"));
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true; on timeout, fails with `why` and the page's errors.
    fn wait_for(&mut self, expr: &str, secs: u64, why: &str) {
        let start = Instant::now();
        while self.eval(expr) != json!(true) {
            if start.elapsed() > Duration::from_secs(secs) {
                let errors = self.eval(
                    "[...document.querySelectorAll('.error')].map(e => e.textContent).join(' | ')",
                );
                panic!("{why}: not after {secs} s (page errors: {errors})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn the_page_inverts_and_edits_an_uploaded_photo() {
    let dir = temp_dir("browser");
    let server = nulltext_serve::Server::start(load_shapes(), args(&dir)).unwrap();
    let (_browser, devtools) = launch(&dir.join("chromium-profile"));
    let mut cdp = Cdp::connect(devtools);
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
    );
    cdp.call(
        "Page.navigate",
        json!({ "url": format!("{}/", server.url()) }),
    );
    cdp.wait_for(
        "document.readyState === 'complete' && document.getElementById('model-info').textContent.includes('shapes')",
        30,
        "the page shows the model",
    );

    // Upload through the file input, as a person choosing a file does.
    let photo = fixtures()
        .join("../../models/shapes/examples/red-circle-on-blue.png")
        .canonicalize()
        .unwrap();
    let root = cdp.call("DOM.getDocument", json!({}))["root"]["nodeId"].clone();
    let input = cdp.call(
        "DOM.querySelector",
        json!({ "nodeId": root, "selector": "#file" }),
    )["nodeId"]
        .clone();
    cdp.call(
        "DOM.setFileInputFiles",
        json!({ "files": [photo.to_str().unwrap()], "nodeId": input }),
    );
    let ready = cdp.eval(
        "(() => {
            const set = (id, v) => { const e = document.getElementById(id); e.value = v;
                                     e.dispatchEvent(new Event('input', { bubbles: true })); };
            set('prompt', 'a red circle on a blue background');
            document.getElementById('advanced').open = true;
            set('steps', '25'); set('inner-steps', '5'); set('size', '64');
            return !document.getElementById('invert').disabled;
        })()",
    );
    assert_eq!(ready, json!(true), "the Invert button stays disabled");
    cdp.wait_for(
        "document.getElementById('preview').naturalWidth === 64",
        10,
        "the preview of the chosen photo",
    );
    cdp.eval("document.getElementById('invert').click()");
    cdp.wait_for(
        "!document.getElementById('workspace').hidden && document.getElementById('reconstruction').naturalWidth === 64",
        90,
        "the reconstruction appears",
    );
    // The bar followed the job's event stream to its end.
    let progress = cdp.eval(
        "(() => { const p = document.getElementById('invert-progress');
                  return [Number(p.dataset.events), p.querySelector('.progress-text').textContent]; })()",
    );
    assert!(
        progress[0].as_u64().unwrap() >= 8,
        "progress events heard: {progress}"
    );
    assert!(
        progress[1].as_str().unwrap().starts_with("done in"),
        "{progress}"
    );

    // the page picked the map scale of the shapes model's own 8×8 latent grid
    let scale = cdp.eval("document.getElementById('attention-downscale').value");
    assert_eq!(scale, "1", "map scale the page chose");
    cdp.eval(
        "(() => {
            document.getElementById('targets').value =
                'a green circle on a blue background\\na yellow circle on a blue background';
            document.getElementById('edit').click();
        })()",
    );
    cdp.wait_for(
        "(() => { const i = document.querySelector('.edit-result img.target');
                  return !!i && i.complete && i.naturalWidth === 64; })()",
        90,
        "the edited image appears",
    );
    let shown = cdp.eval(
        "[...document.querySelectorAll('.edit-result figure')].map(f => [f.querySelector('img').naturalWidth, f.querySelector('figcaption').textContent])",
    );
    let shown = shown.as_array().unwrap();
    assert_eq!(
        shown.len(),
        4,
        "original, reconstruction and the edits side by side: {shown:?}"
    );
    assert!(shown.iter().all(|f| f[0] == 64), "{shown:?}");
    assert!(shown[2][1].as_str().unwrap().contains("green"), "{shown:?}");
    assert!(
        shown[3][1].as_str().unwrap().contains("yellow"),
        "{shown:?}"
    );
    assert_eq!(
        cdp.eval("document.getElementById('edit-error').hidden"),
        json!(true)
    );
    // The server has what the page shows.
    let invs = get(server.addr(), "/v1/inversions").json();
    assert_eq!(invs["inversions"].as_array().unwrap().len(), 1);
    assert_eq!(invs["inversions"][0]["edit_count"], 1);

    // A screenshot of the whole page, attention maps open.
    cdp.eval("document.querySelectorAll('details.maps').forEach(d => d.open = true); window.scrollTo(0, 0)");
    cdp.wait_for(
        "[...document.querySelectorAll('img.attention')].every(i => i.complete && i.naturalWidth > 0)",
        20,
        "the attention maps load",
    );
    let height = cdp
        .eval("Math.ceil(document.documentElement.scrollHeight)")
        .as_u64()
        .unwrap();
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false }),
    );
    let shot = cdp.call("Page.captureScreenshot", json!({ "format": "png" }));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(png_size(&png).0, 1280);
    std::fs::write(dir.join("page.png"), &png).unwrap();
    if let Some(p) = std::env::var_os("NULLTEXT_SCREENSHOT") {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        std::fs::write(root.join(p), &png).unwrap();
    }
    let _ = cdp.call("Browser.close", json!({}));
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
