//! A hostile Graph API stand-in on a raw TCP socket, for the tests that
//! the built-in simulator cannot drive: it echoes whatever credentials it
//! received back in its error texts (as Graph does with a malformed token),
//! sends success bodies of any length, and drops connections mid-request.
//!
//! The recipient (`messenger_delivery_data.subscription_token`) picks the
//! answer:
//!
//! | recipient  | answer |
//! |------------|--------|
//! | `echo`     | 400, Graph error 190 whose every text field quotes the bearer token and the proof |
//! | `foreign`  | 400, Graph error 190 quoting a token-shaped string the caller never had ([`FOREIGN_TOKEN`]) |
//! | `html`     | 502, an HTML page quoting the bearer token and the proof |
//! | `notsend`  | 200, `success: false` quoting the bearer token |
//! | `reset`    | the connection is closed after the request was read, no answer |
//! | `hang`     | no answer for a minute (the client times out) |
//! | `long:<n>` | 200, a valid success padded to `n` bytes, tracking id `mm.long` |
//! | anything else | 200, a plain success, tracking id `mm.ok` |
//!
//! Every response closes its connection, so no state outlives a request.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A token-shaped string (Meta's `EAA…` form) that no test configures.
pub const FOREIGN_TOKEN: &str = "EAAJforeignAppToken0123456789abcdefGHIJKLmnopQRSTuv";

/// A running server; dropping it stops accepting.
pub struct FakeGraph {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    /// Requests read in full.
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGraph {
    /// The base URL with `user:password@` in it.
    pub fn base_url_with_userinfo(&self, user: &str, password: &str) -> String {
        self.base_url
            .replacen("http://", &format!("http://{user}:{password}@"), 1)
    }
}

/// Starts a server on a free loopback port.
pub async fn start() -> FakeGraph {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let _ = serve(stream, &counter).await;
            });
        }
    });
    FakeGraph {
        base_url,
        requests,
        task,
    }
}

struct Request {
    target: String,
    bearer: String,
    body: Value,
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let mut length = 0usize;
    let mut bearer = String::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "authorization" => {
                if let Some(token) = value.strip_prefix("Bearer ") {
                    bearer = token.to_string();
                }
            }
            _ => {}
        }
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
    Ok(Some(Request {
        target,
        bearer,
        body,
    }))
}

async fn serve(mut stream: TcpStream, counter: &AtomicUsize) -> std::io::Result<()> {
    let Some(req) = read_request(&mut stream).await? else {
        return Ok(());
    };
    counter.fetch_add(1, Ordering::SeqCst);
    let proof = req
        .target
        .split_once("appsecret_proof=")
        .map(|(_, p)| p.split('&').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let recipient = req.body["messenger_delivery_data"]["subscription_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let bearer = &req.bearer;
    let (status, content_type, body) = match recipient.as_str() {
        "echo" => (
            "400 Bad Request",
            "application/json",
            json!({"error": {
                "message": format!("Malformed access token {bearer}"),
                "type": "OAuthException",
                "code": 190,
                "error_user_title": format!("Token {bearer} rejected"),
                "error_user_msg": format!("The token {bearer} with proof {proof} is not valid"),
                "fbtrace_id": format!("Atrace{bearer}"),
            }})
            .to_string(),
        ),
        "foreign" => (
            "400 Bad Request",
            "application/json",
            json!({"error": {
                "message": format!("Malformed access token {FOREIGN_TOKEN}"),
                "type": "OAuthException",
                "code": 190,
                "fbtrace_id": "AfakeTrace01",
            }})
            .to_string(),
        ),
        "html" => (
            "502 Bad Gateway",
            "text/html",
            format!("<html><body>upstream refused token={bearer} proof={proof}</body></html>"),
        ),
        "notsend" => (
            "200 OK",
            "application/json",
            json!({"success": false, "token": bearer}).to_string(),
        ),
        "reset" => return Ok(()),
        "hang" => {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            return Ok(());
        }
        r if r.starts_with("long:") => {
            let n: usize = r["long:".len()..].parse().unwrap_or(0);
            let head = r#"{"success":true,"marketing_message_tracking_id":"mm.long","padding":""#;
            let tail = r#""}"#;
            let pad = n.saturating_sub(head.len() + tail.len());
            (
                "200 OK",
                "application/json",
                format!("{head}{}{tail}", "x".repeat(pad)),
            )
        }
        _ => (
            "200 OK",
            "application/json",
            json!({"success": true, "marketing_message_tracking_id": "mm.ok"}).to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    // the client may stop reading a long body: a broken pipe is expected
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
