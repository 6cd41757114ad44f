//! Metrics, health and readiness over HTTP: traffic moves the right counters by the
//! right amounts, and a real Prometheus reads the exposition.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chat::protocol::Code;
use chat::rt;
use common::*;

/// Parses the text exposition into `name{labels}` -> value.
fn parse(exposition: &str) -> HashMap<String, f64> {
    let mut values = HashMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value.parse().expect("a number");
        values.insert(name.to_string(), value);
    }
    values
}

async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    parse(&body)
}

async fn metrics_server() -> TestServer {
    start_with(|c| c.metrics_listen = Some("127.0.0.1:0".into())).await
}

#[test]
fn traffic_moves_the_right_counters_by_the_right_amounts() {
    rt::block_on(async {
        let server = metrics_server().await;
        let m = server.metrics.expect("metrics address");
        let before = scrape(m).await;
        assert_eq!(before["chat_connections"], 0.0);
        let mut a = login(&server, 1).await;
        let mut b = login(&server, 2).await;
        for i in 0..3 {
            let f = text(1, 2, &format!("live {i}"));
            send_confirmed(&mut a, &f).await;
            assert_eq!(recv(&mut b).await, delivered(&f));
        }
        let picture = data(1, 2, 2, &[7u8; 1000]);
        send_confirmed(&mut a, &picture).await;
        assert_eq!(recv(&mut b).await, delivered(&picture));
        send_confirmed(&mut a, &text(1, 3, "for later")).await;
        send_confirmed(&mut a, &text(1, 3, "for later too")).await;
        within(a.send(&chat::protocol::ClientFrame::ping()))
            .await
            .unwrap();
        expect_notice(&mut a, Code::Pong).await;

        // Writers count a frame just after writing it, so the client can see it first:
        // wait until the last writes are counted (no more traffic follows).
        let since = |now: &HashMap<String, f64>, series: &str| {
            now.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
        };
        // A frame sent while its receiver's (empty) mailbox is still being read goes
        // through the store and counts as `mailbox`, not `forward`: count both.
        let to_b = |now: &HashMap<String, f64>| {
            since(now, "chat_frames_out_total{kind=\"forward\"}")
                + since(now, "chat_frames_out_total{kind=\"mailbox\"}")
        };
        let after = within(async {
            loop {
                let now = scrape(m).await;
                if since(&now, "chat_frames_out_total{kind=\"echo\"}") >= 6.0
                    && to_b(&now) >= 4.0
                    && since(&now, "chat_frames_out_total{kind=\"notice\"}") >= 3.0
                {
                    return now;
                }
                rt::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let moved = |series: &str| since(&after, series);
        assert_eq!(after["chat_connections"], 2.0);
        assert_eq!(moved("chat_connections_accepted_total"), 2.0);
        assert_eq!(moved("chat_frames_in_total{type=\"text\"}"), 5.0);
        assert_eq!(moved("chat_frames_in_total{type=\"picture\"}"), 1.0);
        assert_eq!(
            moved("chat_frames_in_total{type=\"control\"}"),
            3.0,
            "two hellos, a ping"
        );
        assert_eq!(moved("chat_frames_out_total{kind=\"echo\"}"), 6.0);
        assert_eq!(to_b(&after), 4.0);
        assert_eq!(moved("chat_frames_out_total{kind=\"notice\"}"), 3.0);
        assert_eq!(moved("chat_notices_total{code=\"welcome\"}"), 2.0);
        assert_eq!(moved("chat_notices_total{code=\"pong\"}"), 1.0);
        assert_eq!(
            moved("chat_delivery_seconds_count"),
            moved("chat_frames_out_total{kind=\"forward\"}"),
            "every live frame's delivery is timed"
        );
        assert_eq!(
            after["chat_mailbox_frames"], 2.0,
            "two frames wait for id 3"
        );
        assert!(after["chat_store_commit_seconds_count"] >= 1.0);
        assert!(moved("chat_bytes_in_total") >= 1000.0);
        for code in Code::ALL {
            assert!(
                after.contains_key(&format!("chat_notices_total{{code=\"{code}\"}}")),
                "{code} has a series"
            );
        }

        // The mailbox is delivered and leaves the store.
        let (_c, got) = mailbox_of(&server.addr(), 3, 2).await;
        let stored = [text(1, 3, "for later"), text(1, 3, "for later too")];
        assert_eq!(got, stored.iter().map(delivered).collect::<Vec<_>>());
        let later = within(async {
            loop {
                let now = scrape(m).await;
                if now["chat_mailbox_frames"] == 0.0 {
                    return now;
                }
                rt::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(
            later["chat_frames_out_total{kind=\"mailbox\"}"]
                - after["chat_frames_out_total{kind=\"mailbox\"}"],
            2.0
        );
    });
}

#[test]
fn refusals_are_counted() {
    rt::block_on(async {
        let server = start_with(|c| {
            c.metrics_listen = Some("127.0.0.1:0".into());
            c.max_connections = 1;
            c.max_connections_per_ip = Some(0);
        })
        .await;
        let m = server.metrics.unwrap();
        let _one = login(&server, 1).await;
        let mut two = connect(&server).await;
        expect_notice(&mut two, Code::ServerBusy).await;
        let after = scrape(m).await;
        assert_eq!(
            after["chat_connections_refused_total{reason=\"server_busy\"}"],
            1.0
        );
        assert_eq!(after["chat_notices_total{code=\"server-busy\"}"], 1.0);
    });
}

#[test]
fn health_readiness_and_unknown_paths() {
    rt::block_on(async {
        let server = metrics_server().await;
        let m = server.metrics.unwrap();
        assert_eq!(http_get(m, "/healthz").await, (200, "ok\n".to_string()));
        assert_eq!(http_get(m, "/readyz").await, (200, "ready\n".to_string()));
        assert_eq!(http_get(m, "/nope").await.0, 404);
        // Not HTTP at all: refused with 400, and the server goes on.
        {
            use futures::{AsyncReadExt, AsyncWriteExt};
            let mut s = within(async_std::net::TcpStream::connect(m)).await.unwrap();
            within(s.write_all(b"\x00\x01garbage\r\n\r\n"))
                .await
                .unwrap();
            let mut out = Vec::new();
            within(s.read_to_end(&mut out)).await.unwrap();
            let text = String::from_utf8_lossy(&out);
            assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        }
        assert_eq!(http_get(m, "/healthz").await.0, 200);
    });
}

/// A real Prometheus scrapes chat-server, and its query API shows the frames sent.
#[test]
fn a_real_prometheus_scrapes_the_metrics() {
    let Some(prometheus) = which("prometheus") else {
        skipping(
            "CHAT_REQUIRE_PROMETHEUS",
            "prometheus is not installed (apt-get install prometheus)",
        );
        return;
    };
    rt::block_on(async {
        let server = metrics_server().await;
        let m = server.metrics.unwrap();
        let dir = tempfile::tempdir().expect("temp dir");
        let (_prometheus, web) = scraping(&prometheus, m, dir.path());
        let mut a = login(&server, 1).await;
        for i in 0..7 {
            send_confirmed(&mut a, &text(1, 0, &format!("scraped {i}"))).await;
        }
        let query = "/api/v1/query?query=sum(chat_frames_in_total%7Btype%3D%22text%22%7D)";
        // Prometheus starts, then scrapes once a second: poll its API until it has it.
        let seen = rt::timeout(Duration::from_secs(60), async {
            loop {
                if let Some((200, body)) = try_get(web, query).await
                    && body.contains("\"7\"")
                {
                    return body;
                }
                rt::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        assert!(seen.is_some(), "Prometheus never showed the 7 text frames");
    });
}

/// Every query of the Grafana dashboard (docker/monitoring/chat-dashboard.json) runs
/// on a real Prometheus scraping a real server, names only metrics the server exports,
/// and the main panels show the traffic sent; promtool accepts the Prometheus config of
/// docker/compose.monitoring.yml. (Grafana itself is not installable here.)
#[test]
fn the_dashboard_s_queries_run_on_a_real_prometheus() {
    let (Some(prometheus), Some(promtool)) = (which("prometheus"), which("promtool")) else {
        skipping(
            "CHAT_REQUIRE_PROMETHEUS",
            "prometheus and promtool are not installed (apt-get install prometheus)",
        );
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked = Command::new(promtool)
        .args(["check", "config", "--syntax-only"])
        .arg(root.join("docker/monitoring/prometheus.yml"))
        .output()
        .expect("promtool runs");
    assert!(checked.status.success(), "{checked:?}");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docker/monitoring/chat-dashboard.json"))
            .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("an expr").to_string())
        .collect();
    assert!(exprs.len() >= 17, "{} queries", exprs.len());
    // What the issue asks the dashboard to show, by metric.
    for wanted in [
        "chat_connections",
        "chat_frames_in_total",
        "chat_frames_out_total",
        "chat_notices_total",
        "chat_store_commit_seconds_bucket",
        "chat_mailbox_frames",
        "chat_slow_consumers_total",
        "chat_store_failures_total",
        "chat_rate_limited_total",
    ] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains(&format!("{wanted}[")) || e.contains(&format!("{wanted})"))),
            "no panel shows {wanted}"
        );
    }
    rt::block_on(async {
        let server = metrics_server().await;
        let m = server.metrics.expect("metrics");
        let (_, exported) = http_get(m, "/metrics").await;
        for expr in &exprs {
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("chat_"))
            {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
                assert!(
                    exported.contains(&format!("\n{family}")),
                    "{name} (in {expr}) is not exported"
                );
            }
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (_prometheus, web) = scraping(&prometheus, m, dir.path());
        let query = |e: &str| {
            let e = e
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m");
            format!("/api/v1/query?query={}", encode(&e))
        };
        // A scrape before the traffic and one after it, so that rates see it.
        let up = rt::timeout(Duration::from_secs(60), async {
            loop {
                if let Some((200, body)) = try_get(web, &query("up == 1")).await
                    && body.contains("\"value\"")
                {
                    return;
                }
                rt::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        assert!(up.is_some(), "Prometheus never scraped the server");
        let mut a = login(&server, 1).await;
        let _b = login(&server, 2).await;
        for i in 0..5 {
            send_confirmed(&mut a, &text(1, 2, &format!("to the dashboard {i}"))).await;
        }
        send_confirmed(&mut a, &text(1, 3, "for the mailbox")).await;
        let seen = rt::timeout(Duration::from_secs(60), async {
            loop {
                let rate = query("sum(rate(chat_frames_in_total[$__rate_interval])) > 0");
                if let Some((200, body)) = try_get(web, &rate).await
                    && body.contains("\"value\"")
                {
                    return;
                }
                rt::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        assert!(
            seen.is_some(),
            "Prometheus never had two scrapes of the traffic"
        );
        for expr in &exprs {
            let (status, body) = try_get(web, &query(expr)).await.expect("an answer");
            assert_eq!(status, 200, "{expr}: {body}");
            assert!(body.contains("\"status\":\"success\""), "{expr}: {body}");
        }
        for shows_traffic in [
            "sum by (type) (rate(chat_frames_in_total[$__rate_interval]))",
            "sum by (instance) (chat_connections)",
            "sum by (instance) (chat_mailbox_frames)",
        ] {
            assert!(exprs.iter().any(|e| e == shows_traffic), "{shows_traffic}");
            let (_, body) = try_get(web, &query(shows_traffic))
                .await
                .expect("an answer");
            assert!(
                body.contains("\"value\""),
                "{shows_traffic} shows nothing: {body}"
            );
        }
    });
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A GET that gives up quietly (Prometheus may not be listening yet).
async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let limit = Duration::from_secs(2);
    let mut s = rt::timeout(limit, async_std::net::TcpStream::connect(addr))
        .await?
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    rt::timeout(limit, s.write_all(request.as_bytes()))
        .await?
        .ok()?;
    let mut response = Vec::new();
    rt::timeout(limit, s.read_to_end(&mut response))
        .await?
        .ok()?;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Guard(Child);

/// A Prometheus in `dir` scraping `target` every second: the process, and the port of
/// address of its web API.
fn scraping(
    prometheus: &std::path::Path,
    target: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (Guard, SocketAddr) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: chat\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("writes");
    let web = free_port();
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    (Guard(child), web)
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
