//! The dead-letter console at campaign scale: a private topology filled
//! with N dead letters (default 100,000; five codes, three campaigns, 50
//! pages, ~500-byte bodies), one console serving it in this process, and
//! every kind of page asked for over HTTP on loopback, as a browser would.
//!
//! ```sh
//! cargo bench --bench console                                    # N = 100,000
//! MMSEND_BENCH_CONSOLE_LETTERS=300000 cargo bench --bench console
//! ```
//!
//! It reports the time of the first snapshot (one peek of the DLQ) and of
//! a refresh, the console's memory per letter (resident set before and
//! after the snapshot), and for each page 30 requests in a row: median,
//! 95th percentile and slowest, with the page's size. Results are printed
//! and written to `bench-console.json` in cargo's `CARGO_TARGET_TMPDIR`
//! (`target/tmp/` unless `CARGO_TARGET_DIR` moves it). Under `cargo test` (no
//! `--bench`) it is a smoke run on 1,000 letters.

#[path = "common/fill.rs"]
mod fill;

use std::time::{Duration, Instant};

use lapin::types::FieldTable;
use lapin::BasicProperties;
use mmsend::broker::headers::{LastError, Story};
use mmsend::broker::{self, Topology};
use mmsend::console::{self, ConsoleConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn amqp_url() -> String {
    std::env::var("MMSEND_AMQP_URL").unwrap_or_else(|_| broker::DEFAULT_AMQP_URL.to_string())
}

const CODES: [(i64, &str, &str); 5] = [
    (
        2300005,
        "mismatch",
        "PAGE_ID_MISMATCH: the page id does not match the page of the subscription token",
    ),
    (
        2300014,
        "mismatch",
        "AD_ACCOUNT_NOT_MATCH: the ad account does not own this campaign",
    ),
    (
        2300030,
        "region",
        "The ad account is not in a supported region.",
    ),
    (
        2300012,
        "not_ready",
        "CAMPAIGN_POPULATING_IN_PROGRESS: try again later",
    ),
    (
        2300015,
        "budget",
        "held back without a call: campaign budget reached (2300015)",
    ),
];
const CAMPAIGNS: [&str; 3] = ["black-friday", "cyber-monday", "xmas"];

/// A dead letter of about 500 bytes, as a worker writes it.
fn letter(i: usize) -> (Vec<u8>, BasicProperties) {
    let (code, class, message) = CODES[i % CODES.len()];
    let body = json!({"v": 1, "job_id": format!("bench-{i:07}"), "ad_account_id": "1234567890",
        "page_id": format!("98765432{:02}", i % 50), "message_id": "120210000000000000",
        "subscription_token": format!("recipient-token-{i:07}-{}", "x".repeat(40)),
        "message": {"text": "Hi {{first_name}}, the black friday deals are in: 40% off everything in the store until Sunday!"},
        "campaign": CAMPAIGNS[i % CAMPAIGNS.len()]});
    let dead_at = chrono::Utc::now() - chrono::Duration::seconds((i % 86_400) as i64);
    let story = Story {
        attempt: 1 + (i % 4) as u32,
        first_attempt_at: Some(dead_at),
        dead_reason: Some(
            if class == "budget" {
                "expired"
            } else {
                "terminal"
            }
            .into(),
        ),
        dead_at: Some(dead_at),
        worker: Some("bench-worker:4242".into()),
        last_error: LastError {
            class: Some(class.into()),
            code: Some(100),
            subcode: Some(code),
            message: Some(message.into()),
            http_status: Some(400),
            fbtrace_id: Some("AbCdEfGhIjK".into()),
            ambiguous: false,
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    (
        serde_json::to_vec(&body).expect("json"),
        BasicProperties::default()
            .with_message_id(format!("bench-{i:07}").into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers),
    )
}

/// This process's resident set, in bytes (Linux).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn snapshot_id(page: &str) -> u64 {
    page.split("data-snapshot=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits for a snapshot newer than `after`; returns its id.
async fn snapshot_after(http: &reqwest::Client, base: &str, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let page = http
            .get(format!("{base}/"))
            .send()
            .await
            .expect("console answers")
            .text()
            .await
            .expect("page");
        let id = snapshot_id(&page);
        if id > after {
            return id;
        }
        assert!(Instant::now() < deadline, "no snapshot after #{after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        1_000
    } else {
        std::env::var("MMSEND_BENCH_CONSOLE_LETTERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000)
    };
    println!(
        "mmsend console bench: {n} letters{}",
        if smoke {
            " (smoke run under cargo test; `cargo bench --bench console` measures)"
        } else {
            ""
        }
    );
    println!("     load average at start: {}", load_average());
    let conn = broker::connect(&amqp_url(), "bench")
        .await
        .expect("RabbitMQ must be running");
    let prefix = format!(
        "mmsend-bench-console-{:06x}",
        rand::random::<u32>() & 0xffffff
    );
    let topology = Topology::new(&prefix, &["1s"], 10).expect("topology");
    topology.declare(&conn).await.expect("declare");
    let fill_s = fill::fill(&conn, &topology, n, letter).await;
    println!("     filled in {fill_s:.1} s");

    let rss_before = rss();
    let mut config = ConsoleConfig::new(&amqp_url(), topology.clone());
    config.listen = "127.0.0.1:0".into();
    config.refresh = Duration::from_secs(3600);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let server = tokio::spawn(console::serve(config, stop.clone(), move |a| {
        let _ = tx.send(a);
    }));
    let addr = rx.await.expect("the console starts");
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let first = snapshot_after(&http, &base, 0).await;
    let first_s = started.elapsed().as_secs_f64();
    let rss_after = rss();
    let per_letter = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;
    println!(
        "     first snapshot: {first_s:.1} s; resident set {} → {} MiB ({per_letter:.0} bytes per letter)",
        rss_before >> 20,
        rss_after >> 20
    );

    // a letter to open: the first of the biggest code group
    let group = http
        .get(format!("{base}/group?dim=code&key=2300005"))
        .send()
        .await
        .expect("group")
        .text()
        .await
        .expect("page");
    let letter = group
        .split("href=\"/letter?")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a letter link")
        .replace("&#38;", "&");
    let last_page = (n / 5).div_ceil(50);
    let pages: Vec<(&str, String)> = vec![
        ("overview", "/".into()),
        (
            "group, page 1 (a fifth of the letters)",
            "/group?dim=code&key=2300005".into(),
        ),
        (
            "group, last page",
            format!("/group?dim=code&key=2300005&page={last_page}"),
        ),
        (
            "all groups of a dimension (pages)",
            "/groups?dim=page".into(),
        ),
        ("one letter's story", format!("/letter?{letter}")),
        (
            "confirmation of a replay of the group",
            "/confirm?kind=replay&dim=code&key=2300005".into(),
        ),
        ("actions", "/actions".into()),
        (
            "letters of a combined filter (campaign, code, since)",
            "/letters?campaign=black-friday&code=2300005&since=2h".into(),
        ),
        (
            "JSONL download of a campaign's code",
            "/letters.jsonl?campaign=black-friday&code=2300005".into(),
        ),
        (
            "find a letter by its job id",
            "/letter?job=bench-0000007".into(),
        ),
        ("status.json (every page polls it)", "/status.json".into()),
    ];
    let rounds = if smoke { 3 } else { 30 };
    let mut results = Vec::new();
    println!(
        "     {:<42} {:>9} {:>9} {:>9} {:>9}",
        "page", "median", "p95", "max", "size"
    );
    for (name, path) in &pages {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let resp = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("page");
            assert_eq!(resp.status().as_u16(), 200, "{path}");
            size = resp.text().await.expect("body").len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let (median, p95, max) = (
            percentile(&times, 0.5),
            percentile(&times, 0.95),
            times[times.len() - 1],
        );
        println!(
            "     {name:<42} {median:>6.2} ms {p95:>6.2} ms {max:>6.2} ms {:>6} KiB",
            size / 1024
        );
        results.push(json!({"page": name, "path": path, "median_ms": median, "p95_ms": p95, "max_ms": max, "bytes": size}));
    }

    // a refresh: pages are answered from the old snapshot meanwhile. The
    // session cookie and the form's CSRF token come from one page.
    let t = Instant::now();
    let resp = http.get(format!("{base}/")).send().await.expect("page");
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .to_string();
    let page = resp.text().await.expect("body");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("csrf")
        .to_string();
    let refreshed = http
        .post(format!("{base}/refresh"))
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&back=%2F"))
        .send()
        .await
        .expect("refresh");
    assert!(refreshed.status().is_redirection() || refreshed.status().is_success());
    let mut during = Vec::new();
    let second = loop {
        let t0 = Instant::now();
        let page = http
            .get(format!("{base}/"))
            .send()
            .await
            .expect("page")
            .text()
            .await
            .expect("body");
        during.push(t0.elapsed().as_secs_f64() * 1000.0);
        let id = snapshot_id(&page);
        if id > first {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refresh_s = t.elapsed().as_secs_f64();
    during.sort_by(f64::total_cmp);
    println!(
        "     refresh (snapshot #{second}): {refresh_s:.1} s; {} overview requests meanwhile, slowest {:.2} ms",
        during.len(),
        during[during.len() - 1]
    );
    println!("     load average at end: {}", load_average());

    stop.cancel();
    server.await.expect("join").expect("console");
    topology.delete(&conn).await.expect("delete");
    let _ = conn.close(200, "bye".into()).await;
    let doc: Value = json!({
        "letters": n,
        "first_snapshot_s": first_s,
        "refresh_s": refresh_s,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_letter": per_letter,
        "pages": results,
        "overview_during_refresh_max_ms": during[during.len() - 1],
    });
    if !smoke {
        let path = concat!(env!("CARGO_TARGET_TMPDIR"), "/bench-console.json");
        std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).expect("cargo's tmp dir");
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json"))
            .expect("write results");
        println!("     written to {path}");
    }
}
