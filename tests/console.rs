//! The dead-letter console against the real RabbitMQ, driven by a real
//! headless Chromium (Debian's `chromium` and `chromium-driver`, through
//! WebDriver with `thirtyfour`) where a person would click, and by a plain
//! HTTP client where the test is about the protocol (auth, CSRF, exact
//! sets). Each test fills its own topology with a few hundred to a few
//! thousand letters; `benches/console.rs` measures pages at 100,000.
//!
//! Without Chromium and chromedriver on the PATH the browser tests say so
//! and skip, unless `MMSEND_REQUIRE_CHROMIUM=1` (set by
//! `deploy/local/test.sh` once it has installed them) makes that a failure.
//! `MMSEND_UPDATE_SCREENSHOT=1` writes the overview's screenshots to
//! `docs/src/console.png` (1440×900) and `docs/src/console-phone.png`
//! (390×844), and the campaigns page's to `docs/src/campaigns.png` (always
//! to cargo's `CARGO_TARGET_TMPDIR`, `target/tmp/` by default).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, job, Harness, Opts};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mmsend::broker::headers::{LastError, Story};
use mmsend::console::{self, ConsoleConfig, ConsoleError};
use mmsend::graph::Secret;
use serde_json::{json, Value};
use thirtyfour::prelude::*;
use thirtyfour::ChromiumLikeCapabilities;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "console-test-token-5f1c2a9e7d";

/// One dead letter as a worker writes it.
#[derive(Clone)]
struct Dead {
    id: String,
    reason: Option<&'static str>,
    class: &'static str,
    code: i64,
    message: String,
    campaign: String,
    page: &'static str,
    /// Minutes before now it died.
    ago: u32,
}

impl Dead {
    fn token(&self) -> String {
        format!("recipient-{}-{}", self.id, "q".repeat(32))
    }
}

/// `n` letters of five kinds, three campaigns and two pages.
fn mixed(n: usize, prefix: &str) -> Vec<Dead> {
    const KINDS: [(Option<&str>, &str, i64, &str); 5] = [
        (
            Some("terminal"),
            "mismatch",
            2300005,
            "PAGE_ID_MISMATCH: the page id does not match the page of the subscription token",
        ),
        (
            Some("terminal"),
            "region",
            2300030,
            "The ad account is not in a supported region.",
        ),
        (
            Some("expired"),
            "budget",
            2300015,
            "held back without a call: campaign budget reached (2300015)",
        ),
        (
            Some("retries_exhausted"),
            "transient",
            2,
            "Service temporarily unavailable",
        ),
        (None, "transient", 1, "An unknown error occurred"),
    ];
    const CAMPAIGNS: [&str; 3] = ["black-friday", "cyber-monday", "xmas"];
    const PAGES: [&str; 2] = ["9876543210", "9876543211"];
    (0..n)
        .map(|i| {
            let (reason, class, code, message) = KINDS[i % KINDS.len()];
            Dead {
                id: format!("{prefix}{i:05}"),
                reason,
                class,
                code,
                message: message.into(),
                campaign: CAMPAIGNS[i % CAMPAIGNS.len()].into(),
                page: PAGES[i % PAGES.len()],
                ago: 0,
            }
        })
        .collect()
}

/// Puts dead letters straight into the DLQ, confirms pipelined.
async fn fill(h: &Harness, letters: &[Dead]) {
    let mut letters_out = Vec::new();
    for d in letters {
        let story = Story {
            attempt: 3,
            dead_reason: d.reason.map(str::to_owned),
            dead_at: Some(chrono::Utc::now() - chrono::Duration::minutes(i64::from(d.ago))),
            worker: Some("worker-7:4242".into()),
            last_error: LastError {
                class: Some(d.class.into()),
                code: Some(d.code),
                message: Some(d.message.clone()),
                http_status: Some(400),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut headers = FieldTable::default();
        story.write(&mut headers);
        let mut body = job(&d.id, &d.token());
        body["campaign"] = json!(&d.campaign);
        body["page_id"] = json!(d.page);
        letters_out.push((d.id.clone(), body, headers));
    }
    h.fill_dlq(letters_out).await;
}

fn no_worker(name: &'static str) -> Opts {
    let mut o = Opts::new(name);
    o.start_worker = false;
    o
}

/// A console served in-process on a free port.
struct Console {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ConsoleError>>,
}

impl Console {
    async fn start(h: &Harness, tweak: impl FnOnce(&mut ConsoleConfig)) -> Console {
        let mut config = ConsoleConfig::new(&common::amqp_url(), h.topology.clone());
        config.listen = "127.0.0.1:0".into();
        // only the first snapshot and the ones a test asks for
        config.refresh = Duration::from_secs(3600);
        tweak(&mut config);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(console::serve(config, stop.clone(), move |a| {
            let _ = tx.send(a);
        }));
        let addr = rx.await.expect("the console starts");
        Console { addr, stop, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A plain HTTP client that keeps the console's session cookie.
struct Client {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
    bearer: Option<String>,
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

impl Client {
    fn new(c: &Console) -> Client {
        Client::from(c, None)
    }

    /// A client whose connections come from `local` (another loopback
    /// address is another client to the console).
    fn from(c: &Console, local: Option<IpAddr>) -> Client {
        Client {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .local_address(local)
                .build()
                .unwrap(),
            base: c.url(""),
            cookie: None,
            bearer: None,
        }
    }

    async fn send(&mut self, mut req: reqwest::RequestBuilder) -> Answer {
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("mmsend_console={c}"));
        }
        if let Some(b) = &self.bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let resp = req.send().await.unwrap();
        for v in resp.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            if let Some(rest) = v.strip_prefix("mmsend_console=") {
                let value = rest.split(';').next().unwrap_or_default();
                self.cookie = (!value.is_empty()).then(|| value.to_string());
            }
        }
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Answer {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    /// Opens the login form and signs in with `token`, going on to `next`.
    async fn sign_in(&mut self, token: &str, next: &str) -> Answer {
        let form = self.get("/login").await;
        let csrf = field(&form.body, "csrf");
        self.post(
            "/login",
            &[("csrf", &csrf), ("token", token), ("next", next)],
        )
        .await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let body = console::query(form).trim_start_matches('?').to_string();
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        self.send(req).await
    }

    /// Waits until the console shows a snapshot newer than `after`; returns its id.
    async fn snapshot_after(&mut self, after: u64) -> u64 {
        let mut id;
        eventually!(
            Duration::from_secs(60),
            {
                id = snapshot_id(&self.get("/").await.body);
                id > after
            },
            "no snapshot after #{after}"
        );
        id
    }
}

/// The value of the first `name="<field>"` input of a page.
fn field(page: &str, name: &str) -> String {
    let needle = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&needle)
        .unwrap_or_else(|| panic!("no {name} field in {page}"))
        + needle.len();
    page[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn snapshot_id(page: &str) -> u64 {
    page.split("data-snapshot=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `mmsend dlq stats --json` as dimension → key → count.
fn cli_stats(h: &Harness) -> BTreeMap<String, BTreeMap<String, usize>> {
    let out = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .args(["dlq", "stats", "--json", "--prefix", &h.topology.prefix])
        .env("MMSEND_AMQP_URL", common::amqp_url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut m = BTreeMap::new();
    for d in ["reason", "class", "code", "campaign", "page"] {
        let groups = v[format!("by_{d}")].as_array().unwrap();
        m.insert(
            d.to_string(),
            groups
                .iter()
                .map(|g| {
                    (
                        g["key"].as_str().unwrap().to_string(),
                        g["count"].as_u64().unwrap() as usize,
                    )
                })
                .collect(),
        );
    }
    m
}

fn count_of(text: &str) -> usize {
    text.trim().replace(',', "").parse().unwrap()
}

// ---------------------------------------------------------------- browser

/// A headless Chromium under chromedriver, with a fresh profile.
struct Browser {
    driver: Option<WebDriver>,
    chromedriver: Child,
    profile: PathBuf,
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

impl Browser {
    /// `None` (after saying why) when Chromium or chromedriver is missing
    /// and not required.
    async fn start() -> Option<Browser> {
        let chrome = on_path(&["chromium", "chromium-browser", "google-chrome"]);
        let driver = on_path(&["chromedriver"]);
        let (Some(chrome), Some(driver)) = (chrome, driver) else {
            let why = "Chromium and chromedriver are not on the PATH (Debian: apt-get install chromium chromium-driver; deploy/local/test.sh installs them when run as root)";
            if std::env::var("MMSEND_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
                panic!("MMSEND_REQUIRE_CHROMIUM=1 but {why}");
            }
            eprintln!("SKIPPED: this browser test did not run: {why}");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let chromedriver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = std::env::temp_dir().join(format!(
            "mmsend-console-chromium-{:08x}",
            rand::random::<u32>()
        ));
        // from here on a failure drops it: nothing is left running
        let mut browser = Browser {
            driver: None,
            chromedriver,
            profile,
        };
        let profile = browser.profile.clone();
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually!(
            Duration::from_secs(20),
            reqwest::get(&status).await.is_ok(),
            "chromedriver answers on {status}"
        );
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary(chrome.to_str().unwrap()).unwrap();
        // outbound connections are refused here: nothing may phone home
        for arg in [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--window-size=1200,860",
            &format!("--user-data-dir={}", profile.display()),
        ] {
            caps.add_arg(arg).unwrap();
        }
        browser.driver = Some(
            WebDriver::new(&url, caps)
                .await
                .expect("a Chromium session"),
        );
        Some(browser)
    }

    fn d(&self) -> &WebDriver {
        self.driver.as_ref().unwrap()
    }

    /// chromedriver and every process it started (Chromium and its
    /// helpers), by pid.
    fn processes(&self) -> Vec<u32> {
        process_tree(self.chromedriver.id(), &self.profile)
    }

    async fn quit(mut self) {
        if let Some(d) = self.driver.take() {
            d.quit().await.unwrap();
        }
    }

    /// The text of the first element matching `css`, waiting for it.
    async fn text(&self, css: &str) -> String {
        let mut text = String::new();
        eventually!(
            Duration::from_secs(20),
            match self.d().find(By::Css(css)).await {
                Ok(e) => match e.text().await {
                    Ok(t) => {
                        text = t;
                        true
                    }
                    Err(_) => false,
                },
                Err(_) => false,
            },
            "no {css} on {:?}",
            self.d().current_url().await.map(|u| u.to_string())
        );
        text
    }

    /// Waits until the text of `css` satisfies `pred` (pages that refresh
    /// themselves are read again and again).
    async fn wait_text(&self, css: &str, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let mut text = String::new();
        eventually!(
            timeout,
            {
                if let Ok(e) = self.d().find(By::Css(css)).await {
                    text = e.text().await.unwrap_or_default();
                }
                pred(&text)
            },
            "{css} never right; last {text:?} at {:?}: {}",
            self.d().current_url().await.map(|u| u.to_string()),
            self.d().source().await.unwrap_or_default()
        );
        text
    }

    async fn click(&self, css: &str) {
        let e = self
            .d()
            .find(By::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        e.click().await.unwrap();
    }
}

/// Whatever ends a test (its end, a failed assertion, a panic), the
/// browser ends with it: chromedriver, Chromium and every helper Chromium
/// started are killed, found before any of them is (a killed parent's
/// children are handed to init and leave the tree).
impl Drop for Browser {
    fn drop(&mut self) {
        let others: Vec<String> = self
            .processes()
            .into_iter()
            .filter(|&p| p != self.chromedriver.id())
            .map(|p| p.to_string())
            .collect();
        let _ = self.chromedriver.kill();
        if !others.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&others)
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.chromedriver.wait();
        // its session died with the processes: asking chromedriver to end
        // it (what dropping a WebDriver that was not quit does) would only
        // wait for a process that is gone
        if let Some(d) = self.driver.take() {
            std::mem::forget(d);
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Saves what the browser shows as `name` in cargo's scratch directory for
/// tests (`CARGO_TARGET_TMPDIR`, wherever `CARGO_TARGET_DIR` is), and with
/// `MMSEND_UPDATE_SCREENSHOT=1` as `docs/src/<docs>` too.
async fn screenshot(b: &Browser, name: &str, docs: Option<&str>) {
    let shot = b.d().screenshot_as_png().await.unwrap();
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join(name), &shot).unwrap();
    if let Some(docs) = docs {
        if std::env::var("MMSEND_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/src");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(docs), &shot).unwrap();
        }
    }
}

/// `/proc/<pid>/stat`: (parent pid, state).
fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((rest.next()?.parse().ok()?, state))
}

/// `root` and its descendants, and any process whose command line names
/// `profile` (a helper Chromium detached from its parent).
fn process_tree(root: u32, profile: &std::path::Path) -> Vec<u32> {
    let profile = profile.to_string_lossy().into_owned();
    let all: Vec<(u32, u32, bool)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (ppid, _) = proc_stat(pid)?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let names_profile = String::from_utf8_lossy(&cmdline).contains(&profile);
            Some((pid, ppid, names_profile))
        })
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    let detached: Vec<u32> = all
        .iter()
        .filter(|p| p.2 && !tree.contains(&p.0))
        .map(|p| p.0)
        .collect();
    tree.extend(detached);
    tree
}

/// Whether a process runs (a zombie waiting for its parent does not).
fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

/// Every group row of the overview as dimension → key → count.
async fn overview_counts(b: &Browser) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut m = BTreeMap::new();
    for table in b.d().find_all(By::Css("table.groups")).await.unwrap() {
        let dim = table.attr("data-dimension").await.unwrap().unwrap();
        let mut groups = BTreeMap::new();
        for row in table.find_all(By::Css("tbody tr")).await.unwrap() {
            let key = row.attr("data-key").await.unwrap().unwrap();
            let n = count_of(
                &row.find(By::Css("td.count"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap(),
            );
            groups.insert(key, n);
        }
        m.insert(dim, groups);
    }
    m
}

#[tokio::test]
async fn the_overview_counts_what_dlq_stats_counts_and_a_letter_tells_its_story() {
    let h = Harness::start(no_worker("console-view")).await;
    let mut letters = mixed(1_200, "v");
    // deaths over two days, a third of them in the last three hours (the
    // chart and the last hour have something to show)
    for (i, d) in letters.iter_mut().enumerate() {
        d.ago = if i % 3 == 0 {
            (i % 180) as u32
        } else {
            (i * 97 % 2_880) as u32
        };
    }
    fill(&h, &letters).await;
    let want = cli_stats(&h);
    assert_eq!(want["code"]["2300005"], 240);
    let c = Console::start(&h, |_| {}).await;
    let Some(b) = Browser::start().await else {
        c.stop().await;
        h.finish().await;
        return;
    };
    b.d().goto(c.url("/")).await.unwrap();
    b.wait_text(
        "#snapshot .snapline",
        |t| t.contains("Snapshot of 1,200 letters"),
        Duration::from_secs(30),
    )
    .await;
    b.d().refresh().await.unwrap();
    assert_eq!(b.text("h1 .count").await, "1,200");
    let shown = overview_counts(&b).await;
    assert_eq!(
        shown, want,
        "the overview's groups are `dlq stats --json`'s"
    );
    // nothing is fetched from anywhere else (`#main`: the skip link, on the page)
    let source = b.d().source().await.unwrap();
    for attr in ["src=\"", "href=\""] {
        for value in source.split(attr).skip(1) {
            assert!(
                value.starts_with('/') || value.starts_with("#main\""),
                "{attr}{}",
                &value[..value.len().min(60)]
            );
        }
    }
    // the README's screenshots: a desktop and a phone
    b.d().set_window_rect(0, 0, 1440, 900).await.unwrap();
    screenshot(&b, "console-overview.png", Some("console.png")).await;
    b.d().set_window_rect(0, 0, 390, 844).await.unwrap();
    screenshot(&b, "console-overview-390.png", Some("console-phone.png")).await;
    b.d().set_window_rect(0, 0, 1440, 900).await.unwrap();

    // open a group: 50 letters a page, all of that group
    b.click("table[data-dimension=\"code\"] tr[data-key=\"2300005\"] td.key a")
        .await;
    let h1 = b.text("h1").await;
    assert!(
        h1.contains("code = 2300005") && h1.contains("240 letters"),
        "{h1}"
    );
    assert!(b
        .text("nav.pager .range")
        .await
        .starts_with("letters 1–50 of 240"));
    let rows = b
        .d()
        .find_all(By::Css("table.letters tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 50);
    for row in &rows {
        assert_eq!(
            row.find(By::Css("td:nth-child(5)"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "2300005"
        );
    }
    b.click("nav.pager a[rel=next]").await;
    assert!(b
        .text("nav.pager .range")
        .await
        .starts_with("letters 51–100 of 240"));

    // open a letter: its whole story, the recipient masked
    let first = b
        .d()
        .find(By::Css("table.letters tbody tr td.key a"))
        .await
        .unwrap();
    let job_id = first.text().await.unwrap();
    first.click().await.unwrap();
    assert_eq!(b.text("h1 .key").await, job_id);
    let letter = letters.iter().find(|d| d.id == job_id).unwrap();
    let headers = b.text("#headers").await.replace('\t', " ");
    for want in [
        "x-mmsend-dead-reason terminal",
        "x-mmsend-class mismatch",
        "x-mmsend-error-code 2300005",
        "x-mmsend-attempt 3",
        "x-mmsend-worker worker-7:4242",
        "x-mmsend-http-status 400",
    ] {
        assert!(headers.contains(want), "{want} not in {headers}");
    }
    let body = b.text("#body").await;
    assert!(
        body.contains(&format!("\"job_id\": \"{job_id}\"")),
        "{body}"
    );
    assert!(
        body.contains("\"subscription_token\": \"reci•••("),
        "{body}"
    );
    let page = b.d().source().await.unwrap();
    assert!(
        !page.contains(&letter.token()),
        "the recipient token reached the page"
    );
    b.quit().await;
    c.stop().await;
    h.finish().await;
}

#[tokio::test]
async fn replaying_a_group_in_the_browser_moves_exactly_that_group_once() {
    let h = Harness::start(Opts::new("console-replay")).await;
    let letters = mixed(300, "r");
    fill(&h, &letters).await;
    let group: Vec<&Dead> = letters.iter().filter(|d| d.code == 2300005).collect();
    assert_eq!(group.len(), 60);
    let c = Console::start(&h, |_| {}).await;
    let Some(b) = Browser::start().await else {
        c.stop().await;
        h.finish().await;
        return;
    };
    b.d().goto(c.url("/")).await.unwrap();
    b.wait_text(
        "#snapshot .snapline",
        |t| t.contains("Snapshot of 300 letters"),
        Duration::from_secs(30),
    )
    .await;
    b.d().refresh().await.unwrap();
    b.click("table[data-dimension=\"code\"] tr[data-key=\"2300005\"] td.key a")
        .await;
    b.click("p.actions a.button").await;
    assert_eq!(b.text("h1").await, "Replay 60 letters?");
    let confirm_url = b.d().current_url().await.unwrap().to_string();
    // a second operator (or a second tab) on the same confirmation
    let tab_a = b.d().window().await.unwrap();
    let tab_b = b.d().new_tab().await.unwrap();
    b.d().switch_to_window(tab_b.clone()).await.unwrap();
    b.d().goto(&confirm_url).await.unwrap();
    assert_eq!(b.text("h1").await, "Replay 60 letters?");

    b.d().switch_to_window(tab_a).await.unwrap();
    b.click("#confirm").await;
    let state = b
        .wait_text(
            "#state",
            |t| t.starts_with("Finished"),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(state, "Finished: 60 of 60 replayed.");
    assert_eq!(b.text("td[data-name=moved]").await, "60");
    let action_url = b.d().current_url().await.unwrap().to_string();
    assert!(action_url.contains("/actions/"), "{action_url}");

    // a worker sends them, each once; the DLQ shrank by exactly the group
    eventually!(
        Duration::from_secs(30),
        h.sim.stats().sent >= 60,
        "sent {:?}",
        h.sim.stats()
    );
    // (a snapshot refresh after the action may hold letters for a moment)
    eventually!(
        Duration::from_secs(30),
        h.depth(&h.topology.dead_queue()).await == 240,
        "240 letters left in the DLQ"
    );

    // the second confirmation starts nothing: it shows the same action
    b.d().switch_to_window(tab_b).await.unwrap();
    b.click("#confirm").await;
    b.wait_text(
        "#state",
        |t| t.starts_with("Finished"),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(b.d().current_url().await.unwrap().to_string(), action_url);
    assert!(b
        .d()
        .source()
        .await
        .unwrap()
        .contains("Asked for again 1 time(s)"));
    b.d().goto(c.url("/actions")).await.unwrap();
    let rows = b
        .d()
        .find_all(By::Css("table.actions-list tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one action for one set");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = h.sim.stats();
    assert_eq!(stats.sent, 60);
    assert_eq!(stats.duplicates, 0);
    let sent: Vec<&String> = stats.sends_by_recipient.keys().collect();
    let mut want: Vec<String> = group.iter().map(|d| d.token()).collect();
    want.sort();
    assert_eq!(
        sent,
        want.iter().collect::<Vec<_>>(),
        "exactly the group's recipients"
    );
    // (a snapshot refresh after the action may hold letters for a moment)
    eventually!(
        Duration::from_secs(30),
        h.depth(&h.topology.dead_queue()).await == 240,
        "240 letters left in the DLQ"
    );

    // the snapshot follows the action
    b.d().goto(c.url("/")).await.unwrap();
    b.wait_text(
        "#snapshot .snapline",
        |t| t.contains("Snapshot of 240 letters"),
        Duration::from_secs(30),
    )
    .await;
    b.quit().await;
    c.stop().await;
    let left: Vec<String> = h
        .drain_dlq()
        .await
        .iter()
        .map(|d| d.job_id().unwrap_or_default())
        .collect();
    let kept: Vec<String> = letters
        .iter()
        .filter(|d| d.code != 2300005)
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(left, kept, "the rest stay, in their order");
    h.finish().await;
}

// ------------------------------------------------------------- protocol

#[tokio::test]
async fn viewing_pages_many_times_leaves_every_letter_in_place() {
    let h = Harness::start(no_worker("console-peek")).await;
    let letters = mixed(2_000, "p");
    fill(&h, &letters).await;
    // refresh as often as the console allows (three times the last scan)
    let c = Console::start(&h, |c| c.refresh = Duration::ZERO).await;
    let mut cl = Client::new(&c);
    let mut last = cl.snapshot_after(0).await;
    let letter = &letters[7];
    let pages = [
        "/".to_string(),
        "/group?dim=code&key=2300030".to_string(),
        "/group?dim=campaign&key=xmas&page=3".to_string(),
        "/groups?dim=page".to_string(),
        "/actions".to_string(),
    ];
    let mut snapshots = 1;
    for round in 0..8 {
        for p in &pages {
            let a = cl.get(p).await;
            assert_eq!(a.status, 200, "{p}");
        }
        if round % 2 == 0 {
            let page = cl.get("/").await.body;
            let a = cl
                .post(
                    "/refresh",
                    &[("csrf", &field(&page, "csrf")), ("back", "/")],
                )
                .await;
            assert_eq!(a.status, 303);
        }
        let id = cl.snapshot_after(last).await;
        let page = cl.get("/").await.body;
        assert!(page.contains("Snapshot of 2,000 letters"), "snapshot #{id}");
        snapshots += 1;
        last = id;
        // a letter's page is found in every snapshot
        let fp = cl
            .get(&format!("/group?dim=code&key={}", letter.code))
            .await
            .body
            .split(&format!("/letter?job={}&#38;fp=", letter.id))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(str::to_owned)
            .unwrap();
        let a = cl.get(&format!("/letter?job={}&fp={fp}", letter.id)).await;
        assert_eq!(a.status, 200);
    }
    assert!(snapshots >= 9, "{snapshots} snapshots");
    c.stop().await;
    let left: Vec<String> = h
        .drain_dlq()
        .await
        .iter()
        .map(|d| d.job_id().unwrap_or_default())
        .collect();
    let want: Vec<String> = letters.iter().map(|d| d.id.clone()).collect();
    assert_eq!(
        left, want,
        "every letter once, in order, after {snapshots} snapshots"
    );
    h.finish().await;
}

#[tokio::test]
async fn purge_touches_the_confirmed_set_only_and_one_letter_can_be_replayed() {
    let h = Harness::start(no_worker("console-exact")).await;
    let letters = mixed(100, "e");
    fill(&h, &letters).await;
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    let page = cl.get("/confirm?kind=purge&dim=code&key=2300005").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Purge 20 letters?"), "{}", page.body);
    let (plan, csrf) = (field(&page.body, "plan"), field(&page.body, "csrf"));
    // five more letters join the group after the confirmation was shown
    let late: Vec<Dead> = mixed(25, "late")
        .into_iter()
        .filter(|d| d.code == 2300005)
        .collect();
    assert_eq!(late.len(), 5);
    fill(&h, &late).await;
    let a = cl
        .post(
            "/actions",
            &[("csrf", &csrf), ("plan", &plan), ("rate", "0")],
        )
        .await;
    assert_eq!(a.status, 303);
    let action = a.location().to_string();
    let mut body;
    eventually!(
        Duration::from_secs(30),
        {
            body = cl.get(&action).await.body;
            body.contains("Finished")
        },
        "{body}"
    );
    assert!(body.contains("Finished: 20 of 20 purged."), "{body}");
    // a snapshot refresh follows every action and holds the letters while it
    // reads them: the depth counts them again when it is done
    eventually!(
        Duration::from_secs(30),
        h.depth(&h.topology.dead_queue()).await == 85,
        "85 letters left in the DLQ"
    );

    // one letter, replayed
    let mut cl2 = Client::new(&c);
    cl2.snapshot_after(1).await;
    let one = &letters[1];
    let group = cl2
        .get(&format!("/group?dim=code&key={}", one.code))
        .await
        .body;
    let fp = group
        .split(&format!("/letter?job={}&#38;fp=", one.id))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let page = cl2
        .get(&format!("/confirm?kind=replay&job={}&fp={fp}", one.id))
        .await;
    assert!(page.body.contains("Replay 1 letter?"), "{}", page.body);
    let a = cl2
        .post(
            "/actions",
            &[
                ("csrf", &field(&page.body, "csrf")),
                ("plan", &field(&page.body, "plan")),
                ("rate", "5"),
            ],
        )
        .await;
    let action = a.location().to_string();
    eventually!(
        Duration::from_secs(30),
        {
            body = cl2.get(&action).await.body;
            body.contains("Finished")
        },
        "{body}"
    );
    assert!(body.contains("Finished: 1 of 1 replayed."), "{body}");
    assert!(body.contains("5 / s"), "the rate asked for: {body}");
    eventually!(
        Duration::from_secs(30),
        h.depth(&h.topology.dead_queue()).await == 84,
        "84 letters left in the DLQ"
    );
    assert_eq!(h.depth(&h.topology.send_queue()).await, 1);
    c.stop().await;
    let left: Vec<String> = h
        .drain_dlq()
        .await
        .iter()
        .map(|d| d.job_id().unwrap_or_default())
        .collect();
    let mut want: Vec<String> = letters
        .iter()
        .filter(|d| d.code != 2300005 && d.id != one.id)
        .map(|d| d.id.clone())
        .collect();
    want.extend(late.iter().map(|d| d.id.clone()));
    assert_eq!(left, want, "late arrivals untouched, the rest in order");
    h.finish().await;
}

#[tokio::test]
async fn a_busy_dlq_keeps_the_last_snapshot_and_an_action_waits_for_it() {
    let h = Harness::start(no_worker("console-busy")).await;
    let letters = mixed(50, "b");
    fill(&h, &letters).await;
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    let first = cl.snapshot_after(0).await;
    // another reader takes the DLQ
    let ch = h.conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _reader = ch
        .basic_consume(
            h.topology.dead_queue().as_str().into(),
            "someone-else".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let page = cl.get("/").await.body;
    cl.post(
        "/refresh",
        &[("csrf", &field(&page, "csrf")), ("back", "/")],
    )
    .await;
    let mut body;
    eventually!(
        Duration::from_secs(20),
        {
            body = cl.get("/").await.body;
            body.contains("other consumer(s) were reading")
        },
        "{body}"
    );
    assert_eq!(snapshot_id(&body), first, "the last snapshot stays");
    assert!(body.contains("Snapshot of 50 letters"));
    // an action confirmed meanwhile waits, and says why
    let page = cl
        .get("/confirm?kind=purge&dim=code&key=2300030")
        .await
        .body;
    let a = cl
        .post(
            "/actions",
            &[
                ("csrf", &field(&page, "csrf")),
                ("plan", &field(&page, "plan")),
            ],
        )
        .await;
    let action = a.location().to_string();
    eventually!(
        Duration::from_secs(20),
        {
            body = cl.get(&action).await.body;
            body.contains("Waiting:")
        },
        "{body}"
    );
    // the other reader goes away: the action runs, the snapshot follows
    ch.close(200, "done".into()).await.unwrap();
    eventually!(
        Duration::from_secs(30),
        {
            body = cl.get(&action).await.body;
            body.contains("Finished")
        },
        "{body}"
    );
    assert!(body.contains("Finished: 10 of 10 purged."), "{body}");
    let id = cl.snapshot_after(first).await;
    assert!(
        cl.get("/").await.body.contains("Snapshot of 40 letters"),
        "#{id}"
    );
    c.stop().await;
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 40);
    h.finish().await;
}

#[tokio::test]
async fn off_loopback_a_token_is_required_and_every_post_needs_its_csrf_token() {
    let h = Harness::start(no_worker("console-auth")).await;
    fill(&h, &mixed(20, "a")).await;
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mmsend"));
        cmd.arg("console")
            .args(args)
            .args(["--prefix", &h.topology.prefix])
            .env("MMSEND_AMQP_URL", common::amqp_url())
            .env_remove("MMSEND_CONSOLE_TOKEN")
            .env_remove("MMSEND_CONSOLE_LISTEN");
        if let Some(t) = token {
            cmd.env("MMSEND_CONSOLE_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // a non-loopback address without a token: refused before listening
    let (code, err) = run(&["--listen", "0.0.0.0:0"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without MMSEND_CONSOLE_TOKEN"),
        "{err}"
    );
    let (code, err) = run(&["--listen", "0.0.0.0:0"], Some("tiny-9f"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("too short") && !err.contains("tiny-9f"),
        "{err}"
    );

    // with a token, on every address
    let c = Console::start(&h, |c| {
        c.listen = "0.0.0.0:0".into();
        c.token = Some(Secret::new(TOKEN));
    })
    .await;
    let mut anon = Client::new(&c);
    let a = anon.get("/").await;
    assert_eq!(a.status, 401, "no token, no page");
    assert!(!a.body.contains("Dead letters"));
    for path in [
        "/group?dim=code&key=2300005",
        "/actions",
        "/confirm?kind=purge&dim=code&key=2300005",
    ] {
        assert_eq!(anon.get(path).await.status, 401, "{path}");
    }
    let a = anon
        .send(
            anon.http
                .get(c.url("/group?dim=code&key=1"))
                .header("accept", "text/html"),
        )
        .await;
    assert_eq!(
        (a.status, a.location()),
        (303, "/login?next=%2Fgroup%3Fdim%3Dcode%26key%3D1")
    );
    assert_eq!(anon.post("/refresh", &[("back", "/")]).await.status, 401);
    anon.bearer = Some(format!("{TOKEN}x"));
    assert_eq!(anon.get("/").await.status, 401, "a wrong bearer token");

    // bearer: pages yes, a POST without the CSRF token no
    let mut bearer = Client::new(&c);
    bearer.bearer = Some(TOKEN.into());
    bearer.snapshot_after(0).await;
    let page = bearer.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Snapshot of 20 letters"));
    assert!(!page.body.contains(TOKEN), "the token never reaches a page");
    assert_eq!(bearer.post("/refresh", &[("back", "/")]).await.status, 403);
    assert_eq!(
        bearer
            .post("/refresh", &[("csrf", "0000"), ("back", "/")])
            .await
            .status,
        403
    );
    let csrf = field(&page.body, "csrf");
    assert_eq!(
        bearer
            .post("/refresh", &[("csrf", &csrf), ("back", "/")])
            .await
            .status,
        303
    );
    let confirm = bearer
        .get("/confirm?kind=purge&dim=code&key=2300005")
        .await
        .body;
    let plan = field(&confirm, "plan");
    assert_eq!(
        bearer.post("/actions", &[("plan", &plan)]).await.status,
        403
    );
    // from another site, even with the token: refused
    let a = bearer
        .send(
            bearer
                .http
                .post(c.url("/actions"))
                .header("origin", "http://evil.example")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("csrf={csrf}&plan={plan}")),
        )
        .await;
    assert_eq!(a.status, 403);
    assert!(
        bearer.get("/actions").await.body.contains("No action yet"),
        "nothing started"
    );

    // the login form: its own CSRF token, the token, then a cookie
    let mut person = Client::new(&c);
    let form = person.get("/login").await;
    assert_eq!(form.status, 200);
    let login_csrf = field(&form.body, "csrf");
    let a = person
        .post("/login", &[("token", TOKEN), ("next", "/")])
        .await;
    assert_eq!(a.status, 401, "a login without its CSRF token");
    let a = person
        .post(
            "/login",
            &[
                ("csrf", &login_csrf),
                ("token", "not-the-token-at-all"),
                ("next", "/"),
            ],
        )
        .await;
    assert_eq!(a.status, 401);
    assert!(a.body.contains("That is not the console token."));
    let a = person
        .post(
            "/login",
            &[
                ("csrf", &login_csrf),
                ("token", TOKEN),
                ("next", "/actions"),
            ],
        )
        .await;
    assert_eq!((a.status, a.location()), (303, "/actions"));
    let page = person.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Sign out"));
    // a CSRF token of another session does not do
    assert_eq!(
        person
            .post("/actions", &[("csrf", &csrf), ("plan", &plan)])
            .await
            .status,
        403
    );
    let mine = field(&page.body, "csrf");
    assert_eq!(person.post("/logout", &[("csrf", &mine)]).await.status, 303);
    assert_eq!(person.get("/").await.status, 401, "signed out");
    c.stop().await;

    // without a token: loopback names only (a rebound DNS name is refused)
    let c = Console::start(&h, |c| c.read_only = true).await;
    let mut local = Client::new(&c);
    let a = local
        .send(local.http.get(c.url("/")).header("host", "evil.example"))
        .await;
    assert_eq!(a.status, 421);
    let page = local.get("/").await;
    assert_eq!(page.status, 200);
    // read-only: no action is offered, none can be started
    local.snapshot_after(0).await;
    let page = local.get("/").await.body;
    assert!(
        page.contains("read-only") && !page.contains("Replay…"),
        "{page}"
    );
    assert_eq!(
        local
            .get("/confirm?kind=purge&dim=code&key=2300005")
            .await
            .status,
        403
    );
    let a = local
        .post(
            "/actions",
            &[("csrf", &field(&page, "csrf")), ("plan", &plan)],
        )
        .await;
    assert_eq!(a.status, 403);
    c.stop().await;
    assert_eq!(
        h.depth(&h.topology.dead_queue()).await,
        20,
        "nothing was touched"
    );
    h.finish().await;
}

// -------------------------------------------------------- round 3: review

/// `next` and `back` values that would leave the console in a browser:
/// `//host`, `/\host`, and what browsers make of control characters (they
/// drop tab, CR and LF from a URL, so `/\t/host` is `//host`).
const OFF_SITE: [&str; 8] = [
    "/\t/evil.example/",
    "/\r\n/evil.example/",
    "/\n/evil.example/",
    "//evil.example/",
    "/\\evil.example/",
    "\\\\evil.example/",
    "http://evil.example/",
    "https:evil.example",
];

#[tokio::test]
async fn redirects_after_login_and_refresh_stay_on_the_console() {
    let h = Harness::start(no_worker("console-redirect")).await;
    fill(&h, &mixed(5, "o")).await;
    // no token: /login sends a visitor straight on to `next`
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    // the way the review sent it: percent-encoded in the URL
    let a = cl.get("/login?next=/%09/evil.example/").await;
    assert_eq!((a.status, a.location()), (303, "/"));
    for next in OFF_SITE {
        let a = cl
            .get(&format!("/login{}", console::query(&[("next", next)])))
            .await;
        assert_eq!((a.status, a.location()), (303, "/"), "next={next:?}");
    }
    let a = cl.get("/login?next=/actions").await;
    assert_eq!((a.status, a.location()), (303, "/actions"));
    cl.snapshot_after(0).await;
    let page = cl.get("/").await.body;
    let csrf = field(&page, "csrf");
    for back in OFF_SITE {
        let a = cl
            .post("/refresh", &[("csrf", &csrf), ("back", back)])
            .await;
        assert_eq!((a.status, a.location()), (303, "/"), "back={back:?}");
    }
    let a = cl
        .post("/refresh", &[("csrf", &csrf), ("back", "/groups?dim=code")])
        .await;
    assert_eq!((a.status, a.location()), (303, "/groups?dim=code"));
    // and where a real browser ends up
    if let Some(b) = Browser::start().await {
        b.d()
            .goto(c.url("/login?next=/%09/evil.example/"))
            .await
            .unwrap();
        let at = b.d().current_url().await.unwrap().to_string();
        assert_eq!(at, c.url("/"), "Chromium left the console");
        b.quit().await;
    }
    c.stop().await;

    // with a token: the login form's `next` after a good sign-in
    let c = Console::start(&h, |c| c.token = Some(Secret::new(TOKEN))).await;
    for next in OFF_SITE {
        let mut cl = Client::new(&c);
        let form = cl
            .get(&format!("/login{}", console::query(&[("next", next)])))
            .await;
        assert_eq!(form.status, 200);
        assert!(!form.body.contains("evil.example"), "{}", form.body);
        let a = cl
            .post(
                "/login",
                &[
                    ("csrf", &field(&form.body, "csrf")),
                    ("token", TOKEN),
                    ("next", next),
                ],
            )
            .await;
        assert_eq!((a.status, a.location()), (303, "/"), "next={next:?}");
    }
    c.stop().await;
    h.finish().await;
}

/// Another client of the console: connections from another loopback address.
fn from(c: &Console, last_octet: u8) -> Client {
    Client::from(c, Some(IpAddr::from([127, 0, 0, last_octet])))
}

/// Sends wrong tokens until the console answers 429; returns how many it
/// took and the answer.
async fn guess_until_refused(cl: &mut Client, login: bool) -> (usize, Answer) {
    let form = cl.get("/login").await;
    let csrf = if login {
        field(&form.body, "csrf")
    } else {
        String::new()
    };
    for n in 1..=500 {
        let guess = format!("not-the-token-{n:04}-xxxxxxxx");
        let a = if login {
            cl.post(
                "/login",
                &[("csrf", &csrf), ("token", &guess), ("next", "/")],
            )
            .await
        } else {
            cl.bearer = Some(guess);
            cl.get("/").await
        };
        if a.status == 429 {
            return (n, a);
        }
        assert_eq!(a.status, 401, "guess {n}: {}", a.body);
    }
    panic!("500 wrong tokens and never refused");
}

fn retry_after(a: &Answer) -> u64 {
    a.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in a 429: {:?}", a.headers))
}

#[tokio::test]
async fn wrong_tokens_lock_out_their_own_client_only() {
    let h = Harness::start(no_worker("console-limit")).await;
    fill(&h, &mixed(5, "l")).await;
    let c = Console::start(&h, |c| c.token = Some(Secret::new(TOKEN))).await;

    // one client guesses at the login form until it is refused
    let mut guesser = from(&c, 1);
    let (n, refused) = guess_until_refused(&mut guesser, true).await;
    assert!((10..=100).contains(&n), "refused after {n} guesses");
    assert!(retry_after(&refused) >= 1);
    assert!(refused.body.contains("Too many"), "{}", refused.body);
    // the right token does not help it now: no answer tells a guess apart
    let a = guesser.sign_in(TOKEN, "/").await;
    assert_eq!(a.status, 429);
    // nor does a bearer token, or a made-up X-Forwarded-For
    guesser.bearer = Some(TOKEN.into());
    assert_eq!(guesser.get("/").await.status, 429);
    let a = guesser
        .send(
            guesser
                .http
                .get(c.url("/"))
                .header("x-forwarded-for", "203.0.113.9"),
        )
        .await;
    assert_eq!(a.status, 429, "X-Forwarded-For is not trusted by default");

    // an operator on another machine signs in as usual
    let mut operator = from(&c, 2);
    let a = operator.sign_in(TOKEN, "/actions").await;
    assert_eq!((a.status, a.location()), (303, "/actions"));
    assert_eq!(operator.get("/").await.status, 200);

    // bearer guesses are limited the same way
    let mut script = from(&c, 3);
    let (n, refused) = guess_until_refused(&mut script, false).await;
    assert!((10..=100).contains(&n), "bearer refused after {n} guesses");
    assert!(retry_after(&refused) >= 1);
    script.bearer = Some(TOKEN.into());
    assert_eq!(script.get("/").await.status, 429);
    // while another script with the token is served
    let mut other = from(&c, 4);
    other.bearer = Some(TOKEN.into());
    assert_eq!(other.get("/").await.status, 200);
    c.stop().await;

    // behind a trusted proxy, the client is the one it names
    let c = Console::start(&h, |c| {
        c.token = Some(Secret::new(TOKEN));
        c.trusted_proxies = vec![IpAddr::from([127, 0, 0, 5])];
    })
    .await;
    let proxy = from(&c, 5);
    let through = |cl: &Client, client: &str, bearer: &str| {
        cl.http
            .get(c.url("/"))
            .header("x-forwarded-for", format!("192.0.2.77, {client}"))
            .header("authorization", format!("Bearer {bearer}"))
    };
    let mut refused = None;
    for n in 1..=100 {
        let a = proxy
            .http
            .execute(
                through(&proxy, "198.51.100.1", "wrong-token-0123456789")
                    .build()
                    .unwrap(),
            )
            .await
            .unwrap();
        if a.status() == 429 {
            refused = Some(n);
            break;
        }
    }
    assert!(refused.is_some_and(|n| n > 10), "{refused:?}");
    let status = |r: reqwest::RequestBuilder| async { r.send().await.unwrap().status().as_u16() };
    assert_eq!(status(through(&proxy, "198.51.100.1", TOKEN)).await, 429);
    assert_eq!(status(through(&proxy, "198.51.100.2", TOKEN)).await, 200);
    c.stop().await;
    h.finish().await;
}

/// A fake Meta access token as Graph echoes one ("Malformed access token …").
const ACCESS: &str = "EAAGm0PX4ZCpsBAFAKEfakeFAKEfake0123456789abcdefZZ";

/// `n` letters whose errors quote an access token and the recipient's
/// token (as Graph's messages can), the first with a token for a campaign
/// label (a producer's mistake).
fn leaky(n: usize, prefix: &str) -> Vec<Dead> {
    let mut letters = mixed(n, prefix);
    for d in &mut letters {
        d.message = format!(
            "Malformed access token {ACCESS} for subscription token {}",
            d.token()
        );
    }
    letters[0].campaign = ACCESS.into();
    letters
}

#[tokio::test]
async fn tokens_in_error_messages_are_masked_on_every_page() {
    let h = Harness::start(no_worker("console-mask")).await;
    let letters = leaky(12, "m");
    fill(&h, &letters).await;
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    let one = &letters[3];
    let group = cl.get(&format!("/group?dim=code&key={}", one.code)).await;
    let fp = group
        .body
        .split(&format!("/letter?job={}&#38;fp=", one.id))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let campaign_link = cl
        .get("/groups?dim=campaign")
        .await
        .body
        .split("href=\"/group?dim=campaign&#38;key=EAAG")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(|rest| format!("/group?dim=campaign&key=EAAG{}", rest.replace("&#38;", "&")))
        .expect("the token-named campaign's group, masked");
    let pages = [
        "/".to_string(),
        "/groups?dim=code".to_string(),
        "/groups?dim=campaign".to_string(),
        format!("/group?dim=code&key={}", one.code),
        "/group?dim=reason&key=terminal".to_string(),
        campaign_link,
        format!("/letter?job={}&fp={fp}", one.id),
        format!("/confirm?kind=replay&dim=code&key={}", one.code),
        format!("/confirm?kind=purge&job={}&fp={fp}", one.id),
    ];
    for p in &pages {
        let a = cl.get(p).await;
        assert_eq!(a.status, 200, "{p}: {}", a.body);
        assert!(!a.body.contains(ACCESS), "the access token on {p}");
        for d in &letters {
            assert!(!a.body.contains(&d.token()), "a recipient token on {p}");
        }
    }
    // the overview and a group still say what went wrong
    for p in ["/", &pages[3]] {
        let body = cl.get(p).await.body;
        assert!(
            body.contains(
                "Malformed access token EAAG•••(49 chars) for subscription token reci•••("
            ),
            "{p}: {body}"
        );
    }
    // an action's pages name what they act on, masked
    let page = cl.get(&pages[8]).await.body;
    let a = cl
        .post(
            "/actions",
            &[
                ("csrf", &field(&page, "csrf")),
                ("plan", &field(&page, "plan")),
            ],
        )
        .await;
    assert_eq!(a.status, 303);
    let action = a.location().to_string();
    for p in [action.as_str(), "/actions"] {
        let body = cl.get(p).await.body;
        assert!(!body.contains(ACCESS), "{p}");
    }
    c.stop().await;
    h.finish().await;
}

#[tokio::test]
async fn a_browser_test_that_panics_leaves_no_browser_running() {
    let (tx, rx) = std::sync::mpsc::channel();
    let test = tokio::spawn(async move {
        let Some(b) = Browser::start().await else {
            return;
        };
        b.d().goto("about:blank").await.unwrap();
        tx.send(b.processes()).unwrap();
        panic!("a browser test fails here");
    });
    let ended = test.await;
    let Ok(pids) = rx.try_recv() else {
        assert!(ended.is_ok(), "{ended:?}");
        return;
    };
    assert!(ended.unwrap_err().is_panic());
    assert!(
        pids.len() >= 3,
        "chromedriver, Chromium and its helpers: {pids:?}"
    );
    eventually!(
        Duration::from_secs(10),
        pids.iter().all(|&p| !running(p)),
        "still running after the test panicked: {:?}",
        pids.iter().filter(|&&p| running(p)).collect::<Vec<_>>()
    );
}

/// The Campaigns pages in Chromium, at 1440×900 and 390×844: the list
/// (state, progress, counts), a campaign's page, pause behind its
/// confirmation page, and cancel only when the campaign's name is typed.
#[tokio::test]
async fn campaigns_are_listed_paused_and_cancelled_in_the_browser() {
    use mmsend::classify::{Class, DeadReason};
    use mmsend::fleet::campaign::{CampaignState, Campaigns, Counted, Tally};
    let h = Harness::start(no_worker("console-campaigns")).await;
    let prefix = h.topology.prefix.clone();
    let redis = mmsend::fleet::FleetConfig::new(&common::redis_url());
    let campaigns = Campaigns::connect(&redis, &prefix).await.unwrap();
    let tally = Tally::default();
    for (name, enqueued, sent, dead) in [
        (
            "black-friday-2026-promo-with-a-rather-long-name",
            2_000u64,
            1_240,
            37,
        ),
        ("cyber-monday", 500, 120, 0),
        ("spring-sale", 300, 300, 0),
    ] {
        campaigns
            .count_enqueued(&[(name.to_string(), enqueued)].into_iter().collect())
            .await
            .unwrap();
        for _ in 0..sent {
            tally.count(name, Counted::Sent);
        }
        for _ in 0..dead {
            tally.count(
                name,
                Counted::Dead(Some(Class::Region), DeadReason::Terminal),
            );
        }
    }
    tally.flush(&campaigns).await.unwrap();
    campaigns
        .set_state(
            "spring-sale",
            CampaignState::Paused,
            "cli:ops",
            "budget review",
        )
        .await
        .unwrap();
    let c = Console::start(&h, |config| config.redis = Some(redis.clone())).await;

    // without a browser the pages still answer
    let mut client = Client::new(&c);
    let list = client.get("/campaigns").await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("cyber-monday") && list.body.contains("<progress"));
    let metrics = client.get("/metrics").await;
    assert!(
        metrics
            .body
            .contains("mmsend_campaign_jobs{campaign=\"cyber-monday\",counter=\"sent\"} 120"),
        "{}",
        metrics.body
    );

    let Some(b) = Browser::start().await else {
        c.stop().await;
        common::delete_redis_keys(&common::redis_url(), &prefix).await;
        h.finish().await;
        return;
    };
    b.d().set_window_rect(0, 0, 1440, 900).await.unwrap();
    b.d().goto(c.url("/campaigns")).await.unwrap();
    let rows = b
        .d()
        .find_all(By::Css("table.campaigns tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let page = b.d().source().await.unwrap();
    assert!(
        page.contains("1,240") && page.contains("64%"),
        "progress of the first"
    );
    screenshot(&b, "console-campaigns.png", Some("campaigns.png")).await;
    // a phone: nothing wider than the screen
    b.d().set_window_rect(0, 0, 390, 844).await.unwrap();
    for path in [
        "/campaigns",
        "/campaign?c=black-friday-2026-promo-with-a-rather-long-name",
    ] {
        b.d().goto(c.url(path)).await.unwrap();
        let widths = b
            .d()
            .execute(
                "return [document.documentElement.scrollWidth, window.innerWidth];",
                vec![],
            )
            .await
            .unwrap()
            .json()
            .clone();
        let (page_w, screen_w) = (widths[0].as_i64().unwrap(), widths[1].as_i64().unwrap());
        assert!(
            page_w <= screen_w,
            "{path} is {page_w} px wide on a {screen_w} px screen"
        );
    }
    b.d().set_window_rect(0, 0, 1440, 900).await.unwrap();

    // pause, confirmed
    b.d().goto(c.url("/campaigns")).await.unwrap();
    b.click("table.campaigns a[title=\"cyber-monday\"]").await;
    b.wait_text(
        "h1",
        |t| t.contains("cyber-monday"),
        Duration::from_secs(20),
    )
    .await;
    b.click("p.actions a:first-child").await;
    assert!(b
        .text("h1")
        .await
        .starts_with("Pause campaign cyber-monday"));
    b.d()
        .find(By::Css("input[name=reason]"))
        .await
        .unwrap()
        .send_keys("wrong promo code")
        .await
        .unwrap();
    b.click("#confirm").await;
    b.wait_text(
        ".note.info",
        |t| t.starts_with("Paused"),
        Duration::from_secs(20),
    )
    .await;
    let shown = campaigns.show("cyber-monday").await.unwrap().unwrap();
    assert_eq!(shown.state, CampaignState::Paused);
    assert_eq!(shown.state_why.as_deref(), Some("wrong promo code"));
    let trail = campaigns.trail(Some("cyber-monday"), 10).await.unwrap();
    assert_eq!(trail[0].action, "pause");
    assert!(trail[0].who.starts_with("console:"), "{:?}", trail[0]);

    // cancel: a wrong name changes nothing, the right one cancels
    b.click("p.actions a.danger").await;
    b.d()
        .find(By::Css("input[name=typed]"))
        .await
        .unwrap()
        .send_keys("cyber")
        .await
        .unwrap();
    b.click("#confirm").await;
    // read once the answer has loaded (the confirmation's h1 is there until then)
    b.wait_text("h1", |t| t == "Not cancelled", Duration::from_secs(20))
        .await;
    assert_eq!(
        campaigns.show("cyber-monday").await.unwrap().unwrap().state,
        CampaignState::Paused
    );
    b.d().back().await.unwrap();
    b.d().refresh().await.unwrap();
    let typed = b.d().find(By::Css("input[name=typed]")).await.unwrap();
    typed.clear().await.unwrap();
    typed.send_keys("cyber-monday").await.unwrap();
    b.click("#confirm").await;
    b.wait_text(
        ".note.info",
        |t| t.starts_with("Cancelled"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        campaigns.show("cyber-monday").await.unwrap().unwrap().state,
        CampaignState::Cancelled
    );
    b.quit().await;
    c.stop().await;
    common::delete_redis_keys(&common::redis_url(), &prefix).await;
    h.finish().await;
}

// ------------------------------------------------ actions: progress, Stop, audit

/// The two window sizes every browser test runs at: a desktop and a phone.
const SIZES: [(u32, u32); 2] = [(1440, 900), (390, 844)];

/// A number as the console prints it (`1,234`), from the first element
/// matching `css`.
async fn number(b: &Browser, css: &str) -> usize {
    count_of(&b.text(css).await)
}

/// Evaluates `script` (a `return …;`) in the page.
async fn js(b: &Browser, script: &str) -> Value {
    b.d().execute(script, vec![]).await.unwrap().json().clone()
}

/// The audit trail's entries of this topology, newest first.
async fn trail(prefix: &str) -> Vec<mmsend::fleet::campaign::AuditEntry> {
    let redis = mmsend::fleet::FleetConfig::new(&common::redis_url());
    let campaigns = mmsend::fleet::campaign::Campaigns::connect(&redis, prefix)
        .await
        .unwrap();
    campaigns.trail(None, 100).await.unwrap()
}

#[tokio::test]
async fn a_slowed_replay_shows_progress_before_its_end_and_stop_keeps_the_exact_set() {
    let h = Harness::start(no_worker("console-stop")).await;
    let prefix = h.topology.prefix.clone();
    let letters = mixed(300, "s");
    fill(&h, &letters).await;
    let c = Console::start(&h, |config| {
        config.redis = Some(mmsend::fleet::FleetConfig::new(&common::redis_url()));
    })
    .await;
    let Some(b) = Browser::start().await else {
        c.stop().await;
        common::delete_redis_keys(&common::redis_url(), &prefix).await;
        h.finish().await;
        return;
    };
    b.d().goto(c.url("/")).await.unwrap();
    b.wait_text(
        "#snapshot .snapline",
        |t| t.contains("Snapshot of 300 letters"),
        Duration::from_secs(30),
    )
    .await;
    // one campaign per window size: 100 letters each, at 5 a second
    let mut stopped = Vec::new();
    for ((width, height), campaign) in SIZES.into_iter().zip(["black-friday", "cyber-monday"]) {
        b.d().set_window_rect(0, 0, width, height).await.unwrap();
        b.d()
            .goto(c.url(&format!(
                "/confirm{}",
                console::query(&[("kind", "replay"), ("dim", "campaign"), ("key", campaign)])
            )))
            .await
            .unwrap();
        assert_eq!(b.text("h1").await, "Replay 100 letters?", "{width} px");
        let rate = b.d().find(By::Css("input[name=rate]")).await.unwrap();
        rate.clear().await.unwrap();
        rate.send_keys("5").await.unwrap();
        b.click("#confirm").await;
        b.wait_text(
            "#state",
            |t| t.starts_with("Running"),
            Duration::from_secs(60),
        )
        .await;
        // no reload from here on: the page updates itself in place
        js(&b, "window.mmsendSamePage = true; return true;").await;
        let moved = b
            .wait_text(
                "td[data-name=moved]",
                |t| t.trim().parse::<usize>().is_ok_and(|n| n > 0),
                Duration::from_secs(60),
            )
            .await;
        let moved: usize = moved.trim().parse().unwrap();
        assert!(moved < 100, "{width} px: progress before the end ({moved})");
        let progress = js(
            &b,
            "var p = document.getElementById('progress'); return [p.value, p.max, document.getElementById(p.getAttribute('aria-labelledby')).textContent, window.mmsendSamePage === true, p.closest('[aria-live]') === null && document.getElementById('state').closest('[aria-live=polite]') !== null];",
        )
        .await;
        assert!(progress[0].as_f64().unwrap() >= 1.0, "{progress}");
        assert_eq!(progress[1].as_f64().unwrap(), 100.0, "{progress}");
        assert!(
            progress[2].as_str().unwrap().ends_with("of 100 replayed"),
            "the bar's label: {progress}"
        );
        assert_eq!(progress[3], json!(true), "updated in place, not reloaded");
        assert_eq!(
            progress[4],
            json!(true),
            "the state is a polite live region"
        );
        assert!(
            !b.d()
                .source()
                .await
                .unwrap()
                .contains("http-equiv=\"refresh\""),
            "no meta refresh"
        );
        b.click("#stop").await;
        let state = b
            .wait_text(
                "#state",
                |t| t.starts_with("Stopped"),
                Duration::from_secs(60),
            )
            .await;
        let moved = number(&b, "td[data-name=moved]").await;
        let kept = number(&b, "td[data-name=kept]").await;
        assert_eq!(moved + kept, 100, "{width} px: moved + kept = all: {state}");
        assert!(moved > 0 && moved < 100, "{width} px: {state}");
        assert_eq!(
            state,
            format!("Stopped: {moved} replayed, {kept} still in the DLQ."),
            "{width} px"
        );
        let by = b.text("td[data-name=stopped_by]").await;
        assert!(by.starts_with("console:loopback-"), "{width} px: {by}");
        stopped.push((campaign, moved, kept));
    }
    eprintln!("stopped (campaign, moved, kept): {stopped:?}");
    // the Actions list, no meta refresh, both actions stopped
    b.d().goto(c.url("/actions")).await.unwrap();
    let rows = b
        .d()
        .find_all(By::Css("table.actions-list tbody tr td[data-state]"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert!(r.text().await.unwrap().starts_with("Stopped: "));
    }
    assert!(!b.d().source().await.unwrap().contains("http-equiv"));
    b.quit().await;

    // the audit trail has each action's start, stop (and who) and end
    let entries = trail(&prefix).await;
    for (campaign, moved, kept) in &stopped {
        let of: Vec<_> = entries
            .iter()
            .filter(|e| e.campaign.as_deref() == Some(*campaign) && e.action == "replay")
            .collect();
        let phases: Vec<&str> = of
            .iter()
            .map(|e| e.what.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(phases, ["end", "stop", "start"], "{of:?}");
        assert_eq!(of[0].count, Some(*moved as u64), "{of:?}");
        assert!(
            of[0]
                .what
                .contains(&format!("{moved} moved, {kept} still in the DLQ")),
            "{of:?}"
        );
        assert!(of[1].what.contains("asked by console:loopback-"), "{of:?}");
        // one browser session started and stopped it
        assert!(of.iter().all(|e| e.who == of[0].who), "{of:?}");
        assert!(of[0].who.starts_with("console:loopback-"), "{of:?}");
    }
    c.stop().await;
    // exactly the moved letters are in the send queue; the kept ones, and
    // every other letter, are still in the DLQ
    let total_moved: usize = stopped.iter().map(|s| s.1).sum();
    assert_eq!(
        h.depth(&h.topology.send_queue()).await as usize,
        total_moved
    );
    let left: Vec<String> = h
        .drain_dlq()
        .await
        .iter()
        .map(|d| d.job_id().unwrap_or_default())
        .collect();
    assert_eq!(left.len(), 300 - total_moved);
    for (campaign, _, kept) in &stopped {
        let still = letters
            .iter()
            .filter(|d| d.campaign == *campaign && left.contains(&d.id))
            .count();
        assert_eq!(still, *kept, "{campaign}: kept letters are in the DLQ");
    }
    let others = letters
        .iter()
        .filter(|d| d.campaign == "xmas" && left.contains(&d.id))
        .count();
    assert_eq!(others, 100, "the other campaign is untouched");
    common::delete_redis_keys(&common::redis_url(), &prefix).await;
    h.finish().await;
}

/// Letters whose replay would fail again: terminal ones of two classes,
/// invalid jobs and RabbitMQ's own delivery-limit dead letters, in one
/// campaign.
fn doomed() -> Vec<Dead> {
    let kinds: [(&str, &str, i64, usize); 4] = [
        ("terminal", "mismatch", 2300005, 4),
        ("terminal", "region", 2300030, 3),
        ("invalid_job", "unknown", 100, 2),
        ("delivery_limit", "transient", 1, 1),
    ];
    let mut out = Vec::new();
    for (reason, class, code, n) in kinds {
        for i in 0..n {
            out.push(Dead {
                id: format!("doomed-{reason}-{i}"),
                reason: Some(reason),
                class,
                code,
                message: "doomed".into(),
                campaign: "doomed".into(),
                page: "9876543210",
                ago: 0,
            });
        }
    }
    out
}

#[tokio::test]
async fn the_replay_confirmation_warns_by_class_at_both_sizes() {
    let h = Harness::start(no_worker("console-warn")).await;
    let mut letters = doomed();
    letters.extend(mixed(10, "w"));
    fill(&h, &letters).await;
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    // a purge says nothing of replays; a set with nothing doomed no warning
    let purge = cl.get("/confirm?kind=purge&dim=campaign&key=doomed").await;
    assert!(!purge.body.contains("role=\"alert\""), "{}", purge.body);
    let calm = cl
        .get("/confirm?kind=replay&dim=reason&key=retries_exhausted")
        .await;
    assert_eq!(calm.status, 200);
    assert!(!calm.body.contains("id=\"warnings\""), "{}", calm.body);
    let Some(b) = Browser::start().await else {
        c.stop().await;
        h.finish().await;
        return;
    };
    for (width, height) in SIZES {
        b.d().set_window_rect(0, 0, width, height).await.unwrap();
        b.d()
            .goto(c.url("/confirm?kind=replay&dim=campaign&key=doomed"))
            .await
            .unwrap();
        assert_eq!(b.text("h1").await, "Replay 10 letters?");
        let alert = b.d().find(By::Css("#warnings[role=alert]")).await.unwrap();
        assert!(alert.is_displayed().await.unwrap(), "{width} px");
        let items = alert.find_all(By::Css("li")).await.unwrap();
        let mut texts = Vec::new();
        for i in items {
            texts.push(i.text().await.unwrap());
        }
        assert_eq!(texts.len(), 3, "{width} px: {texts:?}");
        assert!(
            texts[0].starts_with(
                "7 of these 10 letters died of a terminal error (mismatch 4, region 3)"
            ),
            "{texts:?}"
        );
        assert!(
            texts[1].starts_with("2 of these 10 letters are invalid jobs (reason invalid_job)"),
            "{texts:?}"
        );
        assert!(
            texts[2].starts_with(
                "1 of these 10 letters were dead-lettered by RabbitMQ after too many redeliveries"
            ),
            "{texts:?}"
        );
        // the warnings are on screen, not pushed off to the side
        let inside = js(
            &b,
            "var r = document.getElementById('warnings').getBoundingClientRect(); return r.left >= 0 && r.right <= window.innerWidth;",
        )
        .await;
        assert_eq!(inside, json!(true), "{width} px");
    }
    b.quit().await;
    c.stop().await;
    assert_eq!(h.drain_dlq().await.len(), letters.len(), "nothing moved");
    h.finish().await;
}

#[tokio::test]
async fn a_large_purge_goes_only_with_its_count_typed() {
    let h = Harness::start(no_worker("console-typed")).await;
    let letters = mixed(300, "t");
    fill(&h, &letters).await;
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    // below the threshold there is no box
    let small = cl.get("/confirm?kind=purge&dim=code&key=2300005").await;
    assert!(small.body.contains("Purge 60 letters?"));
    assert!(!small.body.contains("name=\"typed\""));
    let page = cl
        .get("/confirm?kind=purge&dim=campaign&key=black-friday")
        .await;
    assert!(page.body.contains("Purge 100 letters?"), "{}", page.body);
    assert!(page.body.contains("name=\"typed\""), "{}", page.body);
    let (plan, csrf) = (field(&page.body, "plan"), field(&page.body, "csrf"));
    for typed in [None, Some(""), Some("99"), Some("1000")] {
        let mut form = vec![("csrf", csrf.as_str()), ("plan", plan.as_str())];
        if let Some(t) = typed {
            form.push(("typed", t));
        }
        let a = cl.post("/actions", &form).await;
        assert_eq!(a.status, 400, "{typed:?}: {}", a.body);
        assert!(
            a.body.contains("Nothing was purged") && a.body.contains("type 100 in the box"),
            "{}",
            a.body
        );
    }
    assert!(
        cl.get("/actions").await.body.contains("No action yet"),
        "nothing started"
    );
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 300);
    // the Actions page says where actions and the audit trail are kept
    let list = cl.get("/actions").await.body;
    assert!(
        list.contains("remembered only while this console runs"),
        "{list}"
    );
    let a = cl
        .post(
            "/actions",
            &[("csrf", &csrf), ("plan", &plan), ("typed", "100")],
        )
        .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let action = a.location().to_string();
    let mut body;
    eventually!(
        Duration::from_secs(30),
        {
            body = cl.get(&action).await.body;
            body.contains("Finished")
        },
        "{body}"
    );
    assert!(body.contains("Finished: 100 of 100 purged."), "{body}");
    // the JSON the page updates itself from says the same
    let j: Value = serde_json::from_str(&cl.get(&format!("{action}.json")).await.body).unwrap();
    assert_eq!(j["finished"], json!(true));
    assert_eq!(j["state"], json!("Finished: 100 of 100 purged."));
    assert_eq!(j["progress"]["value"], json!(100));
    // the same form sent again needs its count as well (an action that
    // moved nothing would start again from it)
    let again = cl
        .post("/actions", &[("csrf", &csrf), ("plan", &plan)])
        .await;
    assert_eq!(again.status, 400, "{}", again.body);
    // Stop: a finished action is not stopped; a form without its CSRF
    // token is refused; a read-only console refuses it
    let stop = format!("{action}/stop");
    let a = cl.post(&stop, &[("csrf", &csrf)]).await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(a.body.contains("already finished"), "{}", a.body);
    let a = cl.post(&stop, &[("csrf", "forged")]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    let ro = Console::start(&h, |config| config.read_only = true).await;
    let mut rc = Client::new(&ro);
    rc.snapshot_after(0).await;
    let csrf_ro = field(&rc.get("/").await.body, "csrf");
    let a = rc.post(&stop, &[("csrf", &csrf_ro)]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("--read-only"), "{}", a.body);
    ro.stop().await;
    c.stop().await;
    let left = h.drain_dlq().await;
    assert_eq!(left.len(), 200);
    h.finish().await;
}

#[tokio::test]
async fn a_restarted_console_lists_earlier_actions_and_the_audit_trail_has_them() {
    let h = Harness::start(no_worker("console-restart")).await;
    let prefix = h.topology.prefix.clone();
    let letters = mixed(100, "k");
    fill(&h, &letters).await;
    let redis = mmsend::fleet::FleetConfig::new(&common::redis_url());
    let with_redis = |config: &mut ConsoleConfig| config.redis = Some(redis.clone());
    let c = Console::start(&h, with_redis).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    // a purge that finishes
    let page = cl
        .get("/confirm?kind=purge&dim=code&key=2300005")
        .await
        .body;
    let a = cl
        .post(
            "/actions",
            &[
                ("csrf", &field(&page, "csrf")),
                ("plan", &field(&page, "plan")),
            ],
        )
        .await;
    let purge = a.location().to_string();
    let mut body;
    eventually!(
        Duration::from_secs(30),
        {
            body = cl.get(&purge).await.body;
            body.contains("Finished")
        },
        "{body}"
    );
    assert!(body.contains("Finished: 20 of 20 purged."), "{body}");
    // a slow replay that is running when the console stops
    let mut cl = Client::new(&c);
    cl.snapshot_after(1).await;
    let page = cl
        .get("/confirm?kind=replay&dim=code&key=2300030")
        .await
        .body;
    assert!(page.contains("Replay 20 letters?"), "{page}");
    let a = cl
        .post(
            "/actions",
            &[
                ("csrf", &field(&page, "csrf")),
                ("plan", &field(&page, "plan")),
                ("rate", "2"),
            ],
        )
        .await;
    let replay = a.location().to_string();
    eventually!(
        Duration::from_secs(30),
        {
            let j: Value =
                serde_json::from_str(&cl.get(&format!("{replay}.json")).await.body).unwrap();
            j["state"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Running")
        },
        "the replay runs"
    );
    c.stop().await;
    // a console killed while an action ran leaves its record unfinished
    let campaigns = mmsend::fleet::campaign::Campaigns::connect(&redis, &prefix)
        .await
        .unwrap();
    let killed = json!({
        "id": "feedfacefeedfacefeedface",
        "kind": "purge",
        "scope": {"type": "group", "dimension": "code", "key": "2300015"},
        "count": 20,
        "rate": 0,
        "snapshot_at": null,
        "requested_at": chrono::Utc::now(),
        "finished_at": null,
        "state": "queued",
        "repeats": 0,
        "who": "console:loopback-00000000",
        "stopped_by": null,
    });
    campaigns
        .save_console_action("feedfacefeedfacefeedface", 0, &killed.to_string(), 100)
        .await
        .unwrap();

    let c = Console::start(&h, with_redis).await;
    let mut cl = Client::new(&c);
    let killed = cl.get("/actions/feedfacefeedfacefeedface").await;
    assert_eq!(killed.status, 200, "{}", killed.body);
    assert!(
        killed
            .body
            .contains("Its end was not recorded: it was running when its console stopped"),
        "{}",
        killed.body
    );
    assert!(
        !killed.body.contains("id=\"stop\""),
        "a finished action has no Stop"
    );
    let list = cl.get("/actions").await.body;
    assert!(
        list.contains("Purge of group code = 2300005 (20 letters)"),
        "{list}"
    );
    assert!(list.contains("Finished: 20 of 20 purged."), "{list}");
    assert!(
        list.contains("Replay of group code = 2300030 (20 letters)"),
        "{list}"
    );
    assert!(list.contains("kept in Redis"), "{list}");
    let page = cl.get(&replay).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let state = page
        .body
        .split("id=\"state\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap()
        .to_string();
    assert!(
        state.starts_with("Interrupted (the console was stopping): "),
        "{state}"
    );
    let moved = count_of(&field_td(&page.body, "moved"));
    let kept = count_of(&field_td(&page.body, "kept"));
    assert_eq!(moved + kept, 20, "{state}");
    c.stop().await;

    // the trail: start and end of both, with who and how many
    let entries = trail(&prefix).await;
    let purge_id = purge.rsplit('/').next().unwrap();
    let replay_id = replay.rsplit('/').next().unwrap();
    for (id, action, ended) in [
        (purge_id, "purge", "20 moved, 0 still in the DLQ, 0 already gone (finished)"),
        (
            replay_id,
            "replay",
            &*format!("{moved} moved, {kept} still in the DLQ, 0 already gone (interrupted: the console was stopping)"),
        ),
    ] {
        let start = entries
            .iter()
            .find(|e| e.what.starts_with(&format!("start {id}:")))
            .unwrap_or_else(|| panic!("no start of {id}: {entries:?}"));
        let end = entries
            .iter()
            .find(|e| e.what.starts_with(&format!("end {id}:")))
            .unwrap_or_else(|| panic!("no end of {id}: {entries:?}"));
        assert_eq!((start.action.as_str(), end.action.as_str()), (action, action));
        assert!(start.who.starts_with("console:loopback-"), "{start:?}");
        assert_eq!(end.who, start.who);
        assert!(end.what.ends_with(ended), "{end:?}");
        assert!(end.at >= start.at);
    }
    let moved_total = h.depth(&h.topology.send_queue()).await as usize;
    assert_eq!(
        moved_total, moved,
        "the replayed letters are in the send queue"
    );
    assert_eq!(h.drain_dlq().await.len(), 100 - 20 - moved);
    common::delete_redis_keys(&common::redis_url(), &prefix).await;
    h.finish().await;
}

/// The value of `<td … data-name="<name>">` on a page.
fn field_td(page: &str, name: &str) -> String {
    page.split(&format!("data-name=\"{name}\">"))
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or_else(|| panic!("no {name} on {page}"))
        .to_string()
}

/// `mmsend dlq stats --json <flags>`'s total.
fn cli_total(h: &Harness, flags: &[&str]) -> usize {
    let out = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .args(["dlq", "stats", "--json", "--prefix", &h.topology.prefix])
        .args(flags)
        .env("MMSEND_AMQP_URL", common::amqp_url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["total"].as_u64().unwrap() as usize
}

/// The count `/letters?…` shows (the plain page, no browser).
async fn letters_count(cl: &mut Client, query: &str) -> usize {
    let page = cl.get(&format!("/letters{query}")).await;
    assert_eq!(page.status, 200, "{query}: {}", page.body);
    let at = page
        .body
        .find("id=\"letters-count\">")
        .unwrap_or_else(|| panic!("no count on {query}"))
        + "id=\"letters-count\">".len();
    count_of(page.body[at..].split('<').next().unwrap())
}

#[tokio::test]
async fn combined_filters_count_what_the_cli_counts_and_pages_stay_current() {
    let h = Harness::start(no_worker("console-filter")).await;
    let letters = mixed(300, "f");
    fill(&h, &letters).await;
    let c = Console::start(&h, |c| {
        c.grafana_url = Some("https://grafana.example/".into())
    })
    .await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;

    // every combination the CLI takes, as query parameters
    let combos: [&[(&str, &str)]; 7] = [
        &[("campaign", "black-friday"), ("code", "2300005")],
        &[("reason", "terminal"), ("page", "9876543211")],
        &[("class", "budget"), ("campaign", "xmas"), ("since", "1h")],
        &[("code", "2300030"), ("until", "1h")],
        &[("reason", "retries_exhausted"), ("code", "2")],
        &[("job_id", "f00007")],
        &[],
    ];
    for combo in combos {
        let flags: Vec<String> = combo
            .iter()
            .flat_map(|(k, v)| [format!("--{}", k.replace('_', "-")), v.to_string()])
            .collect();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let want = cli_total(&h, &flags);
        let got = letters_count(&mut cl, &console::query(combo)).await;
        assert_eq!(
            got,
            want,
            "/letters{} vs dlq stats {flags:?}",
            console::query(combo)
        );
    }
    assert_eq!(
        letters_count(&mut cl, "?campaign=black-friday&code=2300005").await,
        20
    );
    // a bad value says what is wrong
    let bad = cl.get("/letters?code=abc&since=yesterday").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("code: &#34;abc&#34; is not a number"),
        "{}",
        bad.body
    );

    // the JSONL download is the same set, masked
    let dl = cl
        .get("/letters.jsonl?campaign=black-friday&code=2300005")
        .await;
    assert_eq!(dl.status, 200);
    assert!(dl.headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let lines: Vec<Value> = dl
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    for l in &lines {
        assert_eq!(l["campaign"], "black-friday");
        assert_eq!(l["code"], 2300005);
        let d = letters
            .iter()
            .find(|d| d.id == l["job_id"].as_str().unwrap())
            .unwrap();
        assert!(
            !dl.body.contains(&d.token()),
            "a recipient token in the download"
        );
    }

    // a job id alone finds its letter; an unknown one says where to look
    let found = cl.get("/letter?job=f00007").await;
    assert_eq!(found.status, 303, "{}", found.body);
    assert!(
        found.location().starts_with("/letter?job=f00007&fp="),
        "{}",
        found.location()
    );
    let none = cl.get("/letter?job=no-such-job").await;
    assert_eq!(none.status, 404);
    assert!(none.body.contains("/job?id=no-such-job"), "{}", none.body);

    // the overview leads with campaigns and codes, each campaign linked
    let overview = cl.get("/").await.body;
    let at = |s: &str| {
        overview
            .find(s)
            .unwrap_or_else(|| panic!("{s} not on the overview"))
    };
    assert!(at("id=\"by-campaign\"") < at("id=\"by-code\""));
    assert!(at("id=\"by-code\"") < at("id=\"by-reason\""));
    assert!(at("New in the last hour") < at("id=\"by-campaign\""));
    assert!(overview.contains("href=\"/campaign?c=black-friday\""));
    assert!(
        overview.contains(&format!(
            "href=\"https://grafana.example/d/mmsend/mmsend?var-prefix={}&#38;from=",
            h.topology.prefix
        )),
        "a campaign links to the dashboard"
    );
    assert!(
        overview.contains("2300005 ×20 ·"),
        "a campaign row shows its codes"
    );
    assert!(overview.contains("role=\"img\" aria-label=\"Dead letters per hour"));

    let Some(b) = Browser::start().await else {
        c.stop().await;
        h.finish().await;
        return;
    };
    for (width, height) in SIZES {
        b.d().set_window_rect(0, 0, width, height).await.unwrap();
        b.d().goto(c.url("/")).await.unwrap();
        // the page leads with the chart, the last hour, campaigns and codes
        let order = b
            .d()
            .execute(
                "return Array.from(document.querySelectorAll('main h2, main figure.chart')).map(function (e) { return e.tagName === 'FIGURE' ? 'chart' : e.textContent.trim(); }).slice(0, 4);",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            order.json(),
            &json!(["chart", "New in the last hour", "By campaign", "By code"]),
            "{width}px"
        );
        let campaign_link = b
            .d()
            .find(By::Css(
                "#by-campaign tr[data-key=\"black-friday\"] a[href=\"/campaign?c=black-friday\"]",
            ))
            .await
            .unwrap();
        assert!(campaign_link.is_displayed().await.unwrap(), "{width}px");
        // the filter bar composes two filters; the list says how many
        let form = b.d().find(By::Css("form.filter")).await.unwrap();
        form.find(By::Css("input[name=campaign]"))
            .await
            .unwrap()
            .send_keys("black-friday")
            .await
            .unwrap();
        form.find(By::Css("input[name=code]"))
            .await
            .unwrap()
            .send_keys("2300005")
            .await
            .unwrap();
        form.find(By::Css("button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait_text("#letters-count", |t| t == "20", Duration::from_secs(20))
            .await;
        let rows = b
            .d()
            .find_all(By::Css("table.letters tbody tr"))
            .await
            .unwrap();
        assert_eq!(rows.len(), 20, "{width}px");
        assert_eq!(
            b.text("main p.muted code").await,
            "mmsend dlq stats --code 2300005 --campaign black-friday"
        );
        // the job-id box opens the job's letter
        let find = b
            .d()
            .find(By::Css("form.find input[name=job]"))
            .await
            .unwrap();
        find.send_keys("f00007").await.unwrap();
        b.click("form.find button").await;
        assert_eq!(b.text("h1 .key").await, "f00007", "{width}px");
    }

    // stale no more, with a console whose --refresh is short: letters dead
    // after the snapshot show up on the open page by themselves, without a
    // full-page reload (15 more at each size)
    c.stop().await;
    let c = Console::start(&h, |c| c.refresh = Duration::from_secs(1)).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    let mut total = 300;
    for (i, (width, height)) in SIZES.into_iter().enumerate() {
        b.d().set_window_rect(0, 0, width, height).await.unwrap();
        b.d().goto(c.url("/")).await.unwrap();
        assert_eq!(count_of(&b.text("h1 .count").await), total);
        b.d()
            .execute("window.notReloaded = true;", vec![])
            .await
            .unwrap();
        fill(&h, &mixed(15, &format!("late{i}-"))).await;
        total += 15;
        let now = format!("holds {total} letters now");
        b.wait_text("#live-depth", |t| t.contains(&now), Duration::from_secs(30))
            .await;
        let want = total.to_string();
        b.wait_text("h1 .count", |t| t == want, Duration::from_secs(60))
            .await;
        let same = b
            .d()
            .execute("return window.notReloaded === true;", vec![])
            .await
            .unwrap();
        assert_eq!(
            same.json(),
            &json!(true),
            "the page was reloaded instead of updated in place ({width}px)"
        );
        assert!(b.text("#live-status").await.starts_with("Updated"));
    }

    b.quit().await;

    // replay by filter: exactly the confirmed set moves
    let shown = snapshot_id(&cl.get("/").await.body);
    let confirm = cl
        .get("/confirm?kind=replay&campaign=black-friday&code=2300005")
        .await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    // the snapshot the page showed holds the late letters: two more match
    assert!(
        confirm.body.contains("Replay 22 letters?"),
        "{}",
        confirm.body
    );
    let csrf = field(&confirm.body, "csrf");
    let plan = field(&confirm.body, "plan");
    let started = cl
        .post(
            "/actions",
            &[("csrf", &csrf), ("plan", &plan), ("rate", "0")],
        )
        .await;
    assert_eq!(started.status, 303);
    let action = started.location().to_string();
    eventually!(
        Duration::from_secs(60),
        cl.get(&action)
            .await
            .body
            .contains("Finished: 22 of 22 replayed"),
        "the replay by filter did not finish"
    );
    // the snapshot after the action, then nothing reads the DLQ (asked
    // through /status.json, which starts no refresh of its own while the
    // DLQ holds what the snapshot counted)
    eventually!(
        Duration::from_secs(60),
        {
            let st: Value = serde_json::from_str(&cl.get("/status.json").await.body).unwrap();
            st["snapshot"].as_u64().unwrap() > shown && st["refreshing"] == json!(false)
        },
        "no snapshot after the replay"
    );
    assert_eq!(
        cli_total(&h, &["--campaign", "black-friday", "--code", "2300005"]),
        0
    );
    assert_eq!(cli_total(&h, &[]), 330 - 22);
    c.stop().await;
    h.finish().await;
}

// ------------------------------------ any screen, unreadable letters, masking, accessibility

/// A valid job id of 307 characters (ids are free text).
fn long_job_id() -> String {
    format!("order-{}", "0123456789abcdef-".repeat(18))
        .chars()
        .take(307)
        .collect()
}

/// A campaign name longer than any screen is wide.
const LONG_CAMPAIGN: &str =
    "black-friday-2026-promo-with-a-rather-long-name-for-every-store-in-the-northern-hemisphere";

/// When RabbitMQ dead-lettered the `delivery_limit` letter (its `x-death` time).
const BROKER_DEATH: &str = "2026-12-01T08:00:00Z";

/// The recipient token inside the body that is not JSON.
const CUT_OFF_TOKEN: &str = "recipient-cut-off-abcdefghijklmnopqrstuvwxyz0123";

/// What RabbitMQ writes when a quorum queue's delivery limit dead-letters a
/// message: `x-death` (one entry a queue and reason) and the
/// `x-first-death-*` headers; no `x-mmsend-*` story at all.
fn x_death_headers(queue: &str, count: i64, at: u64) -> FieldTable {
    use lapin::types::{AMQPValue, FieldArray, LongString};
    let mut entry = FieldTable::default();
    entry.insert("count".into(), AMQPValue::LongLongInt(count));
    entry.insert(
        "reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );
    entry.insert("queue".into(), AMQPValue::LongString(queue.into()));
    entry.insert("time".into(), AMQPValue::Timestamp(at));
    entry.insert("exchange".into(), AMQPValue::LongString("".into()));
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            LongString::from(queue),
        )])),
    );
    let mut h = FieldTable::default();
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(entry)])),
    );
    for (k, v) in [
        ("x-first-death-reason", "delivery_limit"),
        ("x-first-death-queue", queue),
        ("x-first-death-exchange", ""),
    ] {
        h.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    h
}

/// Puts into the DLQ, as they arrive there, a letter RabbitMQ dead-lettered
/// itself (`broker-dead-1`) and an `invalid_job` letter whose body is cut
/// off (not JSON, so no job id).
async fn fill_unreadable(h: &Harness) {
    let dlq = h.topology.dead_queue();
    let at = chrono::DateTime::parse_from_rfc3339(BROKER_DEATH)
        .unwrap()
        .timestamp() as u64;
    let body = serde_json::to_vec(&job(
        "broker-dead-1",
        "recipient-broker-dead-1-qqqqqqqqqqqq",
    ))
    .unwrap();
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(x_death_headers(&h.topology.send_queue(), 3, at));
    assert!(h.publish_to("", &dlq, &body, props).await.is_ack());
    let story = Story {
        attempt: 1,
        dead_reason: Some("invalid_job".into()),
        dead_at: Some(chrono::Utc::now()),
        last_error: LastError {
            class: Some("invalid".into()),
            message: Some("the body is not a job: EOF while parsing a string".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    let body = format!(
        "{{\"v\":1,\"job_id\":\"cut-7\",\"subscription_token\":\"{CUT_OFF_TOKEN}\",\"message\":{{\"te"
    );
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    assert!(h
        .publish_to("", &dlq, body.as_bytes(), props)
        .await
        .is_ack());
}

/// Puts one dead letter into the DLQ as [`fill`] does, but without an AMQP
/// `message_id` (a short string: at most 255 bytes, shorter than some ids).
async fn fill_without_message_id(h: &Harness, d: &Dead) {
    let story = Story {
        attempt: 3,
        dead_reason: d.reason.map(str::to_owned),
        dead_at: Some(chrono::Utc::now()),
        last_error: LastError {
            class: Some(d.class.into()),
            code: Some(d.code),
            message: Some(d.message.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    let mut body = job(&d.id, &d.token());
    body["campaign"] = json!(&d.campaign);
    body["page_id"] = json!(d.page);
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    let body = serde_json::to_vec(&body).unwrap();
    let dlq = h.topology.dead_queue();
    assert!(h.publish_to("", &dlq, &body, props).await.is_ack());
}

/// A DLQ and Redis with something on every page: 60 letters of five kinds,
/// one with a 307-character job id, one RabbitMQ dead-lettered, one not
/// JSON; campaigns with counters and a trail; a console on them.
struct Site {
    h: Harness,
    c: Console,
    campaigns: mmsend::fleet::campaign::Campaigns,
    letters: Vec<Dead>,
}

impl Site {
    async fn start(name: &'static str) -> Site {
        use mmsend::fleet::campaign::{CampaignState, Campaigns};
        let h = Harness::start(no_worker(name)).await;
        let mut letters = mixed(60, "s");
        letters.push(Dead {
            id: long_job_id(),
            reason: Some("terminal"),
            class: "mismatch",
            code: 2300099,
            message: format!(
                "PAGE_ID_MISMATCH: {}",
                "the page id does not match the page of the subscription token; ".repeat(4)
            ),
            campaign: LONG_CAMPAIGN.into(),
            page: "9876543210",
            ago: 0,
        });
        fill(&h, &letters[..60]).await;
        fill_without_message_id(&h, &letters[60]).await;
        fill_unreadable(&h).await;
        let redis = mmsend::fleet::FleetConfig::new(&common::redis_url());
        let campaigns = Campaigns::connect(&redis, &h.topology.prefix)
            .await
            .unwrap();
        for (name, n) in [("black-friday", 2_000u64), (LONG_CAMPAIGN, 300)] {
            campaigns
                .count_enqueued(&[(name.to_string(), n)].into_iter().collect())
                .await
                .unwrap();
        }
        campaigns
            .set_state(
                "black-friday",
                CampaignState::Paused,
                "cli:ops",
                "budget review",
            )
            .await
            .unwrap();
        let c = Console::start(&h, |config| config.redis = Some(redis.clone())).await;
        Site {
            h,
            c,
            campaigns,
            letters,
        }
    }

    async fn finish(self) {
        let _ = &self.campaigns;
        self.c.stop().await;
        common::delete_redis_keys(&common::redis_url(), &self.h.topology.prefix).await;
        self.h.finish().await;
    }
}

/// The first `/letter?…` link of a page, as a path.
fn letter_link(page: &str) -> String {
    page.split("href=\"/letter?")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(|q| format!("/letter?{}", q.replace("&#38;", "&")))
        .unwrap_or_else(|| panic!("no letter link in {page}"))
}

/// Starts a purge of a group through its confirmation page and waits until
/// it finished; returns the action's page.
async fn purge(cl: &mut Client, dim: &str, key: &str) -> String {
    let page = cl
        .get(&format!("/confirm?kind=purge&dim={dim}&key={key}"))
        .await
        .body;
    let a = cl
        .post(
            "/actions",
            &[
                ("csrf", &field(&page, "csrf")),
                ("plan", &field(&page, "plan")),
            ],
        )
        .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let action = a.location().to_string();
    let mut body;
    eventually!(
        Duration::from_secs(30),
        {
            body = cl.get(&action).await.body;
            body.contains("Finished")
        },
        "{body}"
    );
    action
}

/// Every kind of page of the site, as paths: (what, path). Starts (and
/// finishes) one purge, of code 2300030, for the action pages.
async fn every_page(site: &Site, cl: &mut Client) -> Vec<(&'static str, String)> {
    let first = cl.snapshot_after(0).await;
    let action = purge(cl, "code", "2300030").await;
    cl.snapshot_after(first).await;
    let long = cl.get("/group?dim=code&key=2300099").await.body;
    let long_letter = letter_link(&long);
    let broker = letter_link(&cl.get("/group?dim=reason&key=delivery_limit").await.body);
    let one = &site.letters[0];
    let group = cl
        .get(&format!("/group?dim=code&key={}", one.code))
        .await
        .body;
    let fp = group
        .split(&format!("/letter?job={}&#38;fp=", one.id))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let one_letter = format!("/letter?job={}&fp={fp}", one.id);
    vec![
        ("overview", "/".to_string()),
        ("groups", "/groups?dim=campaign".to_string()),
        (
            "group with a 307-character job id",
            "/group?dim=code&key=2300099".to_string(),
        ),
        ("group", format!("/group?dim=code&key={}", one.code)),
        (
            "letters of a filter",
            "/letters?campaign=black-friday&code=2300005".to_string(),
        ),
        (
            "letters with a 307-character job id",
            "/letters?code=2300099".to_string(),
        ),
        ("letter with a 307-character job id", long_letter),
        ("letter RabbitMQ dead-lettered", broker),
        ("letter", one_letter),
        (
            "confirm a group",
            "/confirm?kind=replay&dim=code&key=2300099".to_string(),
        ),
        (
            "confirm a letter",
            format!("/confirm?kind=purge&job={}&fp={fp}", one.id),
        ),
        ("actions", "/actions".to_string()),
        ("action", action),
        ("campaigns", "/campaigns".to_string()),
        (
            "campaign",
            format!("/campaign{}", console::query(&[("c", "black-friday")])),
        ),
        (
            "campaign with a long name",
            format!("/campaign{}", console::query(&[("c", LONG_CAMPAIGN)])),
        ),
        (
            "confirm a campaign's cancel",
            format!(
                "/campaign/confirm{}",
                console::query(&[("c", LONG_CAMPAIGN), ("action", "cancel")])
            ),
        ),
        (
            "job with a 307-character id",
            format!("/job{}", console::query(&[("id", &long_job_id())])),
        ),
        ("job", format!("/job?id={}", one.id)),
        ("message", "/no-such-page".to_string()),
    ]
}

/// `[document.documentElement.scrollWidth, window.innerWidth]`.
async fn widths(b: &Browser) -> (i64, i64) {
    let w = b
        .d()
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await
        .unwrap()
        .json()
        .clone();
    (w[0].as_i64().unwrap(), w[1].as_i64().unwrap())
}

/// No page is wider than the screen, on a phone or a desktop, not
/// even with a 307-character job id; tables scroll in their own box (which
/// the keyboard can reach) or become cards, long keys are cut with the whole
/// value on hover and shown whole on the letter's page.
#[tokio::test]
async fn every_page_fits_a_phone_and_a_desktop() {
    let site = Site::start("console-fit").await;
    let mut cl = Client::new(&site.c);
    let pages = every_page(&site, &mut cl).await;
    // the login form needs a console with a token
    let guarded = Console::start(&site.h, |c| c.token = Some(Secret::new(TOKEN))).await;
    let Some(b) = Browser::start().await else {
        guarded.stop().await;
        site.finish().await;
        return;
    };
    let mut urls: Vec<(&str, String)> = pages.iter().map(|(w, p)| (*w, site.c.url(p))).collect();
    urls.push(("login", guarded.url("/login")));
    let mut wide = Vec::new();
    for (w, h) in SIZES {
        b.d().set_window_rect(0, 0, w, h).await.unwrap();
        for (what, url) in &urls {
            b.d().goto(url).await.unwrap();
            let (page_w, screen_w) = widths(&b).await;
            assert!(screen_w > 0 && screen_w <= w as i64, "{screen_w}");
            if page_w > screen_w {
                wide.push(format!(
                    "{what} is {page_w} px wide on a {screen_w} px screen"
                ));
            }
        }
    }
    assert!(wide.is_empty(), "{wide:#?}");

    // the long id: cut in the list, whole on hover and on its own page
    let id = long_job_id();
    let shown: String = id.chars().take(200).collect();
    b.d()
        .goto(site.c.url("/group?dim=code&key=2300099"))
        .await
        .unwrap();
    let link = b.d().find(By::Css("table.letters td.key a")).await.unwrap();
    let title = link.attr("title").await.unwrap().unwrap();
    assert!(title.starts_with(&shown), "{title}");
    let (box_w, text_w) = {
        let v = b
            .d()
            .execute(
                "var a = document.querySelector('table.letters td.key a'); return [a.clientWidth, a.scrollWidth];",
                vec![],
            )
            .await
            .unwrap()
            .json()
            .clone();
        (v[0].as_i64().unwrap(), v[1].as_i64().unwrap())
    };
    assert!(
        box_w < text_w,
        "the id is cut in the list: {box_w} of {text_w} px"
    );
    // every table box can be reached with the keyboard and has a name
    let boxes = b
        .d()
        .execute(
            "return Array.from(document.querySelectorAll('table')).map(function (t) { var s = t.closest('.scroll'); return s ? [s.getAttribute('tabindex'), s.getAttribute('aria-label') || ''] : null; });",
            vec![],
        )
        .await
        .unwrap()
        .json()
        .clone();
    for bx in boxes.as_array().unwrap() {
        assert_eq!(bx[0], "0", "{boxes}");
        assert!(!bx[1].as_str().unwrap().is_empty(), "{boxes}");
    }
    link.click().await.unwrap();
    let h1 = b.text("h1 .key").await;
    assert!(
        h1.starts_with(&shown),
        "the letter's page shows the id whole: {h1}"
    );
    // on a phone the groups become cards, with the actions on screen
    b.d().set_window_rect(0, 0, 390, 844).await.unwrap();
    b.d().goto(site.c.url("/")).await.unwrap();
    let purge = b
        .d()
        .find(By::Css("table[data-dimension=\"code\"] td.acts a.danger"))
        .await
        .unwrap();
    let right = purge.rect().await.map(|r| r.x + r.width).unwrap();
    assert!(
        right <= 390.0,
        "Purge ends at {right} px on a 390 px screen"
    );
    // for a person to look at
    for (name, path) in [("overview", "/"), ("group", "/group?dim=code&key=2300099")] {
        b.d().goto(site.c.url(path)).await.unwrap();
        screenshot(&b, &format!("console-{name}-long-keys-390.png"), None).await;
    }
    b.quit().await;
    guarded.stop().await;
    site.finish().await;
}

/// A letter RabbitMQ dead-lettered itself shows its `x-death` and
/// dies when that says; a letter whose body is not JSON has a link and a
/// page (by its fingerprint) that says so.
#[tokio::test]
async fn letters_without_a_story_or_a_job_id_can_be_read() {
    let h = Harness::start(no_worker("console-unreadable")).await;
    fill(&h, &mixed(10, "u")).await;
    fill_unreadable(&h).await;
    let c = Console::start(&h, |_| {}).await;
    let Some(b) = Browser::start().await else {
        c.stop().await;
        h.finish().await;
        return;
    };
    let died = chrono::DateTime::parse_from_rfc3339(BROKER_DEATH)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    b.d().goto(c.url("/")).await.unwrap();
    b.wait_text(
        "#snapshot .snapline",
        |t| t.contains("Snapshot of 12 letters"),
        Duration::from_secs(30),
    )
    .await;
    b.d().refresh().await.unwrap();
    // in the lists: the broker's time of death, not "-"
    let row = "table[data-dimension=\"reason\"] tr[data-key=\"delivery_limit\"]";
    let times = b.text(&format!("{row} td.t")).await;
    assert_eq!(times, died, "oldest of the delivery_limit group");
    b.click(&format!("{row} td.key a")).await;
    let broker_row = b
        .d()
        .find(By::XPath(
            "//table[@class='letters']//tr[td[@class='key']/a[text()='broker-dead-1']]",
        ))
        .await
        .unwrap();
    let dead_at = broker_row
        .find(By::Css("td.t"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(dead_at, died);
    broker_row
        .find(By::Css("td.key a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(b.text("h1 .key").await, "broker-dead-1");
    let rows = b.d().find_all(By::Css("#x-death tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 1);
    let cells: Vec<String> = {
        let mut v = Vec::new();
        for td in rows[0].find_all(By::Css("td")).await.unwrap() {
            v.push(td.text().await.unwrap());
        }
        v
    };
    assert_eq!(
        cells,
        [
            "delivery_limit".to_string(),
            h.topology.send_queue(),
            format!("{died} UTC"),
            "3".to_string()
        ]
    );
    let facts = b.text("dl.facts").await;
    assert!(facts.contains(&died), "dead at: {facts}");

    // the letter that is not JSON: listed, linked by its fingerprint
    b.d()
        .goto(c.url("/group?dim=reason&key=invalid_job"))
        .await
        .unwrap();
    let link = b
        .d()
        .find(By::Css("table.letters tbody tr td.key a"))
        .await
        .unwrap();
    assert_eq!(link.text().await.unwrap(), "(no job id)");
    let href = link.attr("href").await.unwrap().unwrap();
    assert!(
        href.starts_with("/letter?fp=") && !href.contains("job="),
        "{href}"
    );
    link.click().await.unwrap();
    assert!(b.text("h1").await.contains("(no job id)"));
    let note = b.text(".note.warn").await;
    assert!(note.contains("not JSON"), "{note}");
    let body = b.text("#body").await;
    assert!(body.starts_with("{\"v\":1,\"job_id\":\"cut-7\""), "{body}");
    assert!(body.contains("reci•••("), "the token masked: {body}");
    let page = b.d().source().await.unwrap();
    assert!(
        !page.contains(CUT_OFF_TOKEN),
        "the recipient token reached the page"
    );
    // its replay names it by the same fingerprint
    b.click("p.actions a.button").await;
    assert_eq!(b.text("h1").await, "Replay 1 letter?");
    b.quit().await;
    c.stop().await;
    h.finish().await;
}

/// Token-shaped values a careless producer or Graph put where keys and
/// errors go (none is a real token).
const PAGE_TOKEN: &str = "EAAPageIdThatIsReallyAToken0123456789abcdef";
const JOB_TOKEN: &str = "EAAJobIdThatIsReallyAToken0123456789abcdefgh";

/// A token in an error, a campaign, a page id or a job id is masked
/// on every page that can show it, the campaign pages and the job page
/// included; a campaign named by a token can still be opened and paused.
#[tokio::test]
async fn tokens_in_keys_and_errors_are_masked_on_every_page_in_the_browser() {
    use mmsend::fleet::campaign::{CampaignState, Campaigns};
    let h = Harness::start(no_worker("console-mask-all")).await;
    let mut letters = leaky(15, "t");
    letters[1].page = PAGE_TOKEN;
    letters[2].id = JOB_TOKEN.into();
    fill(&h, &letters).await;
    let redis = mmsend::fleet::FleetConfig::new(&common::redis_url());
    let prefix = h.topology.prefix.clone();
    let campaigns = Campaigns::connect(&redis, &prefix).await.unwrap();
    campaigns
        .count_enqueued(&[(ACCESS.to_string(), 40)].into_iter().collect())
        .await
        .unwrap();
    let c = Console::start(&h, |config| config.redis = Some(redis.clone())).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    let Some(b) = Browser::start().await else {
        c.stop().await;
        common::delete_redis_keys(&common::redis_url(), &prefix).await;
        h.finish().await;
        return;
    };
    let secrets: Vec<String> = [ACCESS, PAGE_TOKEN, JOB_TOKEN]
        .iter()
        .map(|s| s.to_string())
        .chain(letters.iter().map(Dead::token))
        .collect();
    let mut leaks = Vec::new();
    let mut seen = 0;
    let check = |page: &str, at: &str, leaks: &mut Vec<String>| {
        for s in &secrets {
            if page.contains(s.as_str()) {
                leaks.push(format!("{} on {at}", &s[..12]));
            }
        }
    };
    // the pages, reached as a person would: by following the links
    let href_of = |page: &str, start: &str| -> String {
        page.split(&format!("href=\"{}", start.replace('&', "&amp;")))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(|rest| format!("{start}{}", rest.replace("&amp;", "&")))
            .unwrap_or_else(|| panic!("no link {start}… in {page}"))
    };
    let visit = |path: String| {
        let url = c.url(&path);
        let b = &b;
        async move {
            b.d().goto(&url).await.unwrap();
            b.d().source().await.unwrap()
        }
    };
    let mut pages: Vec<(String, String)> = Vec::new();
    for path in [
        "/".to_string(),
        "/groups?dim=campaign".to_string(),
        "/groups?dim=page".to_string(),
        "/groups?dim=code".to_string(),
        format!("/group?dim=code&key={}", letters[2].code),
        format!("/job?id={JOB_TOKEN}"),
        "/campaigns".to_string(),
    ] {
        let src = visit(path.clone()).await;
        pages.push((path, src));
    }
    let masked_campaign = href_of(&pages[1].1, "/group?dim=campaign&key=EAAG");
    let masked_page = href_of(&pages[2].1, "/group?dim=page&key=EAAP");
    let token_letter = href_of(&pages[4].1, "/letter?job=EAAJ");
    let campaign = href_of(&pages[6].1, "/campaign?c=EAAG");
    for path in [
        masked_campaign.clone(),
        masked_page,
        token_letter.clone(),
        campaign.clone(),
    ] {
        let src = visit(path.clone()).await;
        pages.push((path, src));
    }
    let letter_page = pages
        .last()
        .map(|_| ())
        .and(pages.iter().find(|p| p.0 == token_letter))
        .unwrap()
        .1
        .clone();
    let job = href_of(&letter_page, "/job?id=EAAJ");
    let confirm_letter = href_of(&letter_page, "/confirm?kind=replay&job=EAAJ");
    let campaign_page = pages.iter().find(|p| p.0 == campaign).unwrap().1.clone();
    let pause = href_of(&campaign_page, "/campaign/confirm?c=EAAG");
    let confirm_group = masked_campaign.replace("/group?", "/confirm?kind=purge&");
    for path in [job, confirm_letter, pause.clone(), confirm_group] {
        let src = visit(path.clone()).await;
        pages.push((path, src));
    }
    // an action on the letter with the token for a job id, and its pages
    b.d()
        .goto(c.url(&href_of(&letter_page, "/confirm?kind=replay&job=EAAJ")))
        .await
        .unwrap();
    b.click("#confirm").await;
    b.wait_text(
        "#state",
        |t| t.starts_with("Finished"),
        Duration::from_secs(30),
    )
    .await;
    let action = b.d().current_url().await.unwrap().path().to_string();
    for path in [action, "/actions".to_string()] {
        let src = visit(path.clone()).await;
        pages.push((path, src));
    }
    // a campaign named by a token is paused through its masked name
    b.d().goto(c.url(&pause)).await.unwrap();
    assert!(b.text("h1").await.starts_with("Pause campaign EAAG•••("));
    b.click("#confirm").await;
    b.wait_text(
        ".note.info",
        |t| t.starts_with("Paused"),
        Duration::from_secs(20),
    )
    .await;
    let src = b.d().source().await.unwrap();
    pages.push(("after the pause".into(), src));
    let view = campaigns.show(ACCESS).await.unwrap().unwrap();
    assert_eq!(view.state, CampaignState::Paused);
    for (path, src) in &pages {
        check(src, path, &mut leaks);
        seen += 1;
    }
    assert!(leaks.is_empty(), "{leaks:#?}");
    assert_eq!(seen, 18, "every page was read");
    // and they still say what went wrong
    for (path, src) in &pages[..5] {
        if path == "/groups?dim=page"
            || path == "/groups?dim=campaign"
            || path == "/groups?dim=code"
            || path == "/"
        {
            assert!(
                src.contains(
                    "Malformed access token EAAG•••(49 chars) for subscription token reci•••("
                ),
                "{path}"
            );
        }
    }
    b.quit().await;
    c.stop().await;
    common::delete_redis_keys(&common::redis_url(), &prefix).await;
    h.finish().await;
}

/// The contrast of every visible text against its own background
/// (WCAG 2: relative luminance, the background the first ancestor with
/// one paints, blended over white), in the page: `{checked, failures,
/// dark}`.
const CONTRAST_JS: &str = r##"
function parse(c) {
  var m = /rgba?\(([^)]+)\)/.exec(c);
  if (!m) { return null; }
  var p = m[1].split(/[\s,\/]+/).filter(Boolean).map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
}
function blend(top, under) {
  var a = top[3];
  return [0, 1, 2].map(function (i) { return top[i] * a + under[i] * (1 - a); }).concat([1]);
}
function lum(c) {
  var v = [0, 1, 2].map(function (i) {
    var x = c[i] / 255;
    return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2];
}
function background(el) {
  var layers = [];
  for (var e = el; e; e = e.parentElement) {
    var c = parse(getComputedStyle(e).backgroundColor);
    if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) { break; } }
  }
  var base = [255, 255, 255, 1];
  for (var i = layers.length - 1; i >= 0; i--) { base = blend(layers[i], base); }
  return base;
}
var failures = [], checked = 0;
var walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walk.nextNode()) {
  var t = walk.currentNode;
  if (!t.nodeValue.trim()) { continue; }
  var el = t.parentElement;
  var r = document.createRange();
  r.selectNodeContents(t);
  var box = r.getBoundingClientRect();
  if (!r.getClientRects().length || box.width === 0 || box.right <= 0 || box.bottom <= 0) { continue; }
  var s = getComputedStyle(el);
  if (s.visibility !== "visible") { continue; }
  var bg = background(el);
  var fg = parse(s.color);
  if (fg[3] < 1) { fg = blend(fg, bg); }
  var l1 = lum(fg), l2 = lum(bg);
  var ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
  checked++;
  if (ratio < 4.5) {
    failures.push(el.tagName.toLowerCase() + "." + el.className + " \"" + t.nodeValue.trim().slice(0, 40) + "\" " + s.color + " on rgb(" + bg.slice(0, 3).map(Math.round).join(", ") + ") = " + ratio.toFixed(2));
  }
}
return { checked: checked, failures: failures, dark: matchMedia("(prefers-color-scheme: dark)").matches };
"##;

/// In both colour schemes every text has a contrast of at least
/// 4.5:1 against its own background. The scheme is emulated through the
/// DevTools protocol (`Emulation.setEmulatedMedia`, which chromedriver
/// passes on and which lasts for the tab): unlike a command-line switch it
/// needs no second browser and the page itself confirms it (`matchMedia`).
#[tokio::test]
async fn every_text_is_readable_in_both_colour_schemes() {
    let site = Site::start("console-contrast").await;
    let mut cl = Client::new(&site.c);
    let pages = every_page(&site, &mut cl).await;
    let Some(b) = Browser::start().await else {
        site.finish().await;
        return;
    };
    b.d().set_window_rect(0, 0, 1440, 900).await.unwrap();
    let mut failures = Vec::new();
    for scheme in ["light", "dark"] {
        b.d()
            .cdp()
            .send_raw(
                "Emulation.setEmulatedMedia",
                json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
            )
            .await
            .unwrap();
        for (what, path) in &pages {
            b.d().goto(site.c.url(path)).await.unwrap();
            let v = b
                .d()
                .execute(CONTRAST_JS, vec![])
                .await
                .unwrap()
                .json()
                .clone();
            assert_eq!(
                v["dark"],
                json!(scheme == "dark"),
                "{scheme} not emulated on {what}"
            );
            assert!(v["checked"].as_u64().unwrap() > 5, "{what}: {v}");
            for f in v["failures"].as_array().unwrap() {
                failures.push(format!("{scheme} {what}: {}", f.as_str().unwrap()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    b.quit().await;
    site.finish().await;
}

/// Accessible names (aria-label, else the text, else the title) of the
/// page's links and buttons that act, and what the page lacks: a skip link
/// first, landmarks, a name for every table, a label for every field.
const A11Y_JS: &str = r##"
function name(e) {
  var l = (e.getAttribute("aria-label") || "").trim();
  if (l) { return l; }
  var t = (e.innerText || e.textContent || "").trim();
  return t || (e.getAttribute("title") || "").trim();
}
var acts = Array.from(document.querySelectorAll("a.act, a.button, p.actions a, td.acts a, button")).map(function (e) {
  var to = e.tagName === "BUTTON" ? (e.form ? e.form.getAttribute("action") + " " + e.form.querySelectorAll("input").length + " " + (e.form.querySelector("input[name=plan]") || {}).value : "") : e.getAttribute("href");
  return [name(e), to || ""];
});
var problems = [];
var focusable = document.querySelector("a[href], button, input:not([type=hidden]), select, textarea, [tabindex]:not([tabindex='-1'])");
if (!focusable || !focusable.classList.contains("skip") || focusable.getAttribute("href") !== "#main" || name(focusable) !== "Skip to content") {
  problems.push("the first focusable element is not the skip link: " + (focusable ? focusable.outerHTML.slice(0, 80) : "none"));
}
if (!document.querySelector("main#main")) { problems.push("no main#main"); }
if (!document.querySelector("body > header")) { problems.push("no header"); }
document.querySelectorAll("nav").forEach(function (n) { if (!n.getAttribute("aria-label")) { problems.push("a nav without a name"); } });
document.querySelectorAll("table").forEach(function (t) {
  if (!t.querySelector("caption") && !(t.getAttribute("aria-label") || "").trim()) { problems.push("a table without a name: " + t.className); }
});
document.querySelectorAll("input:not([type=hidden]), select, textarea, progress").forEach(function (i) {
  var ok = (i.getAttribute("aria-label") || "").trim() || (i.id && document.querySelector("label[for='" + i.id + "']")) || i.closest("label");
  if (!ok) { problems.push("an unlabelled " + i.tagName.toLowerCase() + " " + (i.name || "")); }
});
return { acts: acts, problems: problems, refresh: !!document.querySelector("meta[http-equiv='refresh' i]") };
"##;

/// Every action link or button has a name that says what it does
/// to what (no two on a page share one unless they go to the same place,
/// none is empty); a "Skip to content" link comes first and leads to
/// `<main id="main">`; header, nav and main are there; every table has a
/// name and every field a label.
#[tokio::test]
async fn every_action_has_a_name_and_every_page_its_landmarks() {
    let site = Site::start("console-names").await;
    let mut cl = Client::new(&site.c);
    let pages = every_page(&site, &mut cl).await;
    let Some(b) = Browser::start().await else {
        site.finish().await;
        return;
    };
    let mut problems = Vec::new();
    let mut named = 0;
    for (what, path) in &pages {
        b.d().goto(site.c.url(path)).await.unwrap();
        let v = b.d().execute(A11Y_JS, vec![]).await.unwrap().json().clone();
        for p in v["problems"].as_array().unwrap() {
            problems.push(format!("{what}: {}", p.as_str().unwrap()));
        }
        let mut by_name: BTreeMap<String, String> = BTreeMap::new();
        for a in v["acts"].as_array().unwrap() {
            let (name, to) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
            named += 1;
            if name.is_empty() {
                problems.push(format!("{what}: an action without a name, to {to}"));
            }
            if let Some(other) = by_name.insert(name.to_string(), to.to_string()) {
                if other != to {
                    problems.push(format!(
                        "{what}: two actions named {name:?}: {other} and {to}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(named > 50, "only {named} actions seen");
    // the overview's 40-odd Replay… links name their group
    b.d().goto(site.c.url("/")).await.unwrap();
    let replay = b
        .d()
        .find(By::Css(
            "table[data-dimension=\"campaign\"] tr[data-key=\"black-friday\"] td.acts a",
        ))
        .await
        .unwrap();
    let label = replay.attr("aria-label").await.unwrap().unwrap();
    assert!(
        label.starts_with("Replay the ") && label.ends_with(" letters of campaign black-friday"),
        "{label}"
    );
    // the keyboard: the first Tab lands on the skip link, which leads to main
    b.d()
        .find(By::Css("body"))
        .await
        .unwrap()
        .send_keys(Key::Tab)
        .await
        .unwrap();
    let first = b.d().active_element().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "Skip to content");
    first.send_keys(Key::Enter).await.unwrap();
    let focused = b
        .d()
        .execute("return document.activeElement.id;", vec![])
        .await
        .unwrap()
        .json()
        .clone();
    assert_eq!(focused, json!("main"));
    b.quit().await;
    site.finish().await;
}

/// No page reloads itself (`<meta http-equiv=refresh>`), not even
/// while an action runs: pages that change update in place.
///
/// Until the action pages update in place (their own change, merged
/// separately), this fails on `/actions` and `/actions/<id>` while an
/// action runs: they still send a 1–2 s meta refresh.
#[tokio::test]
async fn no_page_reloads_itself() {
    let site = Site::start("console-no-refresh").await;
    let mut cl = Client::new(&site.c);
    let mut pages = every_page(&site, &mut cl).await;
    // a slow replay (one letter a second), to look at while it runs
    let page = cl
        .get("/confirm?kind=replay&dim=code&key=2300005")
        .await
        .body;
    let a = cl
        .post(
            "/actions",
            &[
                ("csrf", &field(&page, "csrf")),
                ("plan", &field(&page, "plan")),
                ("rate", "1"),
            ],
        )
        .await;
    assert_eq!(a.status, 303);
    let running = a.location().to_string();
    let Some(b) = Browser::start().await else {
        site.finish().await;
        return;
    };
    pages.insert(0, ("a running action", running.clone()));
    pages.insert(1, ("actions while one runs", "/actions".into()));
    let mut reloading = Vec::new();
    for (what, path) in &pages {
        b.d().goto(site.c.url(path)).await.unwrap();
        let v = b.d().execute(A11Y_JS, vec![]).await.unwrap().json().clone();
        if v["refresh"] == json!(true) {
            reloading.push(format!("{what} ({path})"));
        }
    }
    let body = cl.get(&running).await.body;
    assert!(
        !body.contains("Finished"),
        "the action ended before its pages were read: {body}"
    );
    assert!(
        reloading.is_empty(),
        "pages that reload themselves: {reloading:#?}"
    );
    b.quit().await;
    site.finish().await;
}

/// A job id longer than the snapshot keeps (200 characters) finds its
/// letter whole, in `/letter?job=` and in `/letters?job_id=`, as `dlq
/// stats --job-id` counts it; a token typed into a filter is masked in the
/// page that lists it.
#[tokio::test]
async fn a_long_job_id_finds_its_letter_and_a_typed_token_is_masked() {
    let h = Harness::start(no_worker("console-long-id")).await;
    let mut letters = mixed(5, "i");
    letters[0].id = long_job_id();
    fill(&h, &letters[1..]).await;
    fill_without_message_id(&h, &letters[0]).await;
    let c = Console::start(&h, |_| {}).await;
    let mut cl = Client::new(&c);
    cl.snapshot_after(0).await;
    let id = long_job_id();
    assert_eq!(cli_total(&h, &["--job-id", &id]), 1);
    assert_eq!(
        letters_count(&mut cl, &console::query(&[("job_id", &id)])).await,
        1
    );
    let found = cl
        .get(&format!("/letter{}", console::query(&[("job", &id)])))
        .await;
    assert_eq!(found.status, 303, "{}", found.body);
    assert!(
        found.location().starts_with("/letter?job="),
        "{}",
        found.location()
    );
    let typed = cl
        .get(&format!(
            "/letters{}",
            console::query(&[("campaign", ACCESS)])
        ))
        .await;
    assert_eq!(typed.status, 200);
    assert!(
        !typed.body.contains(ACCESS),
        "a typed token reached the page"
    );
    c.stop().await;
    h.finish().await;
}
