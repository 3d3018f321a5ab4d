//! A headless Chromium driven through chromedriver (both from Debian:
//! `chromium`, `chromium-driver`) with the `fantoccini` WebDriver client,
//! behind blocking methods so the tests mix it freely with the blocking
//! vman harness. Every wait polls a DOM condition (a script that returns
//! something truthy) against a deadline; nothing sleeps a fixed time.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

/// Where screenshots and figures go: `target/ui-artifacts/`.
pub fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("ui-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/ui-artifacts");
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct Browser {
    rt: Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    base: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` x
    /// `height`, for pages of the server at `base` (http://127.0.0.1:port).
    pub fn start(base: &str, width: u32, height: u32) -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; scripts/setup.sh installs it)");
        let profile = tempfile::Builder::new()
            .prefix("vman-ui-chromium-")
            .tempdir()
            .expect("profile dir");
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-extensions", "--disable-background-networking",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
                "prefs": {"profile.content_settings.exceptions.clipboard": {}},
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        let client = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            builder.capabilities(caps.clone());
            match rt.block_on(builder.connect(&url)) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "no WebDriver session from chromedriver on {url}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        Browser {
            rt,
            client: Some(client),
            driver,
            _profile: profile,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    /// Loads `path` of the server (a new page load).
    pub fn goto(&self, path: &str) {
        let url = format!("{}{path}", self.base);
        self.rt
            .block_on(self.c().goto(&url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    pub fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.c().execute(script, args))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something truthy (not null, false,
    /// 0 or ""); returns that. Panics after `deadline` with `what` and the
    /// page's visible text.
    pub fn wait(&self, what: &str, deadline: Duration, script: &str, args: Vec<Value>) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, args.clone());
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if start.elapsed() > deadline {
                let text = self.js(
                    "return document.body ? document.body.innerText : ''",
                    vec![],
                );
                panic!(
                    "waited {deadline:?} for {what}; the page shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until `css` matches an element.
    pub fn wait_for(&self, css: &str, deadline: Duration) {
        self.wait(
            &format!("an element {css}"),
            deadline,
            "return !!document.querySelector(arguments[0])",
            vec![json!(css)],
        );
    }

    /// Clicks the element `css` (a real WebDriver click: it must be visible).
    pub fn click(&self, css: &str) {
        self.rt
            .block_on(async {
                let el = self.c().find(Locator::Css(css)).await?;
                el.click().await
            })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `text` into the element `css` (keyboard events, as a person).
    pub fn type_into(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let el = self.c().find(Locator::Css(css)).await?;
                el.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Clears the input `css` and types `text`.
    pub fn fill(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let el = self.c().find(Locator::Css(css)).await?;
                el.clear().await?;
                el.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("fill {css}: {e}"));
    }

    /// Chooses the option `value` of the select `css`.
    pub fn select(&self, css: &str, value: &str) {
        self.rt
            .block_on(async {
                let el = self.c().find(Locator::Css(css)).await?;
                el.select_by_value(value).await
            })
            .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
    }

    /// Resizes the window (e.g. to a phone's width).
    pub fn window_size(&self, width: u32, height: u32) {
        self.rt
            .block_on(self.c().set_window_size(width, height))
            .unwrap_or_else(|e| panic!("window size {width}x{height}: {e}"));
    }

    /// The text of the first element `css` matches ("" when none).
    pub fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            vec![json!(css)],
        )
        .as_str()
        .unwrap_or("")
        .to_owned()
    }

    /// Saves a PNG of the window as `target/ui-artifacts/<name>.png`.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .rt
            .block_on(self.c().screenshot())
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
        let path = artifacts().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// The lines the serial console's terminal shows (xterm.js rows).
    pub fn terminal_lines(&self) -> Vec<String> {
        let v = self.js(
            "const rows = document.querySelector('#terminal .xterm-rows');
             return rows ? Array.from(rows.children, r => r.textContent.replace(/\\u00a0/g, ' ')) : [];",
            vec![],
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(|s| s.trim_end().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(client.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
