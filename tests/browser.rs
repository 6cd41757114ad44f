//! The web client in a real browser: Debian's `chromium`, driven through `chromedriver`
//! (WebDriver), against the real `chat-server` binary with `--web-listen`.
//!
//! Two browser sessions sign in as two ids and exchange a text and a picture; one of
//! them also talks with `chat-client` both ways; two sessions of one id share history
//! and read markers, on one server and across the two nodes of a cluster (which needs
//! nats-server too). Screenshots go to
//! `target/tmp/browser/`. Needs `apt-get install chromium chromium-driver`; skips with
//! one line without them, unless CHAT_REQUIRE_BROWSER=1 (CI) makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use common::nats::{Nats, nats_available, node};
use common::{ServerProcess, WAIT, chat_client, skipping, start_in};

/// How long the browser may take to show something (a page load, a frame's arrival).
const SHOW: Duration = Duration::from_secs(30);

/// chromium and chromedriver, if installed.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    };
    let found = find("chromium").zip(find("chromedriver"));
    if found.is_none() {
        skipping(
            "CHAT_REQUIRE_BROWSER",
            "needs chromium and chromedriver (apt-get install chromium chromium-driver)",
        );
    }
    found
}

/// A chromedriver process on a free loopback port, killed when dropped; its log is
/// kept, to say why when a session cannot be had.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Driver {
    /// Starts chromedriver on a free port and waits until chromedriver itself answers
    /// there. A port found free can be taken before chromedriver binds it (the tests
    /// start servers on ephemeral ports at the same time), and chromedriver then still
    /// runs on the IPv6 side of it while the IPv4 one is another server's: its first
    /// request was reset about one run in five. So the port is checked to be
    /// chromedriver's (`GET /status`), and another one tried if it is not.
    fn start(path: &Path) -> Driver {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
            std::fs::create_dir_all(&dir).expect("a directory for the logs");
            let log = dir.join(format!("chromedriver-{port}.log"));
            let child = Command::new(path)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let mut driver = Driver {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log,
            };
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                match status(port) {
                    Status::Chromedriver => return driver,
                    Status::Someone => break,
                    Status::Nobody => {}
                }
                if driver.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = driver.child.kill();
            let _ = driver.child.wait();
        }
        panic!("chromedriver did not answer on any of five ports");
    }
}

/// Who answers `GET /status` on a loopback port.
enum Status {
    Nobody,
    Chromedriver,
    Someone,
}

fn status(port: u16) -> Status {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return Status::Nobody;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return Status::Someone;
    }
    // Read until chromedriver's answer is in (it may keep the connection open), the
    // stream ends, or it times out.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let is_chromedriver = |a: &[u8]| {
        let a = String::from_utf8_lossy(a);
        a.contains("ChromeDriver") && a.contains("\"ready\"")
    };
    while !is_chromedriver(&answer) {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    if is_chromedriver(&answer) {
        Status::Chromedriver
    } else if answer.is_empty() {
        // Listening, not answering yet (or not HTTP): look again.
        Status::Nobody
    } else {
        Status::Someone
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The log is for a failure; a passing test leaves none.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

async fn session(driver: &Driver, chromium: &Path, width: u32, height: u32) -> Client {
    let options = json!({
        "binary": chromium,
        "args": [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            // A microphone that plays a test tone, and no permission prompt.
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            format!("--window-size={width},{height}"),
        ],
    });
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert("goog:chromeOptions".into(), options);
    match ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
    {
        Ok(client) => client,
        Err(e) => {
            let log = std::fs::read_to_string(&driver.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "a browser session: {e}; chromedriver's log ({}) ends:\n{}",
                driver.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Two sessions of one id on the two nodes of a cluster: both list what a terminal
/// sent to the id through the first node, reading on one clears the other's unread
/// count, what one sends shows on the other as its own, and a reload loads the
/// conversation from JetStream. Needs nats-server as well (CHAT_REQUIRE_NATS).
#[tokio::test(flavor = "current_thread")]
async fn two_sessions_of_one_id_on_two_nodes_of_a_cluster_share_the_conversation() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    if !nats_available() {
        return;
    }
    let nats = Nats::start(1, "");
    let dir = tempfile::tempdir().unwrap();
    let (listen_a, web_a) = web_address();
    let (listen_b, web_b) = web_address();
    let a = node(&nats, "a", dir.path(), &["--web-listen", &listen_a]);
    let _b = node(&nats, "b", dir.path(), &["--web-listen", &listen_b]);
    let driver = Driver::start(&chromedriver);
    let one = session(&driver, &chromium, 1000, 700).await;
    let two = session(&driver, &chromium, 1000, 700).await;
    sign_in(&one, &web_a, 301).await;
    sign_in(&two, &web_b, 301).await;

    // Five messages from the terminal (id 302) through node a: both sessions list the
    // conversation with 5 unread.
    let lines: String = (0..5).map(|i| format!("c{i}\n")).collect();
    let sent = chat_client(&["--server", &a.addr, "--id", "302", "--to", "301"], &lines);
    assert!(sent.status.success(), "{sent:?}");
    let badge = "return (document.querySelector(\"#conversations button[data-peer='302'] .unread\") || {}).textContent === '5'";
    for tab in [&one, &two] {
        wait_true(tab, badge).await;
    }

    // The session on node a reads them; the one on node b no longer counts them.
    open_listed(&one, 302).await;
    wait_count(&one, "#messages li.msg.in .text", 5).await;
    let want: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    assert_eq!(received_texts(&one).await, want, "in order, once each");
    wait_true(
        &two,
        "return document.querySelector(\"#conversations button[data-peer='302'] .unread\") === null",
    )
    .await;

    // It answers; the session on node b shows the answer as its own.
    send_text(&one, "answer from node a").await;
    open_listed(&two, 302).await;
    let answered = "return [...document.querySelectorAll('#messages li.msg.out .text')].some((e) => e.textContent === 'answer from node a')";
    wait_true(&two, answered).await;

    // The session on node b reloads: the whole conversation comes from the stream.
    two.refresh().await.unwrap();
    find(&two, "#status.online").await;
    open_listed(&two, 302).await;
    wait_count(&two, "#messages li.msg .text", 6).await;
    wait_true(&two, answered).await;
    assert_eq!(received_texts(&two).await, want);
    screenshot(&two, "cluster-reloaded.png").await;
    one.close().await.unwrap();
    two.close().await.unwrap();
}

/// A free loopback address for the web listener, and the page's URL there.
fn web_address() -> (String, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let web = format!("http://{listen}/");
    (listen, web)
}

async fn find(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(SHOW)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("nothing matches {css}: {e}"))
}

async fn sign_in(browser: &Client, web: &str, id: u32) {
    browser.goto(web).await.expect("the page loads");
    find(browser, "#my-id")
        .await
        .send_keys(&id.to_string())
        .await
        .unwrap();
    find(browser, "#signin-button").await.click().await.unwrap();
    find(browser, "#status.online").await;
}

async fn open_conversation(browser: &Client, peer: u32) {
    find(browser, "#peer-id")
        .await
        .send_keys(&peer.to_string())
        .await
        .unwrap();
    find(browser, "#new-chat button")
        .await
        .click()
        .await
        .unwrap();
    find(browser, "#composer:not([hidden])").await;
}

/// Opens the conversation with `peer` from the list, once the list shows it.
async fn open_listed(browser: &Client, peer: u32) {
    let button = format!("#conversations button[data-peer='{peer}']");
    find(browser, &button).await.click().await.unwrap();
}

/// Types `text` and sends it, without waiting for its echo.
async fn type_and_send(browser: &Client, text: &str) {
    find(browser, "#text").await.send_keys(text).await.unwrap();
    find(browser, "#send").await.click().await.unwrap();
}

async fn send_text(browser: &Client, text: &str) {
    let before = count(browser, "#messages li.msg.out[data-status=sent]").await;
    type_and_send(browser, text).await;
    wait_count(
        browser,
        "#messages li.msg.out[data-status=sent]",
        before + 1,
    )
    .await;
}

async fn count(browser: &Client, css: &str) -> usize {
    browser
        .find_all(Locator::Css(css))
        .await
        .map_or(0, |all| all.len())
}

/// Waits until at least `n` elements match `css`.
async fn wait_count(browser: &Client, css: &str, n: usize) {
    let deadline = Instant::now() + SHOW;
    while count(browser, css).await < n {
        assert!(Instant::now() < deadline, "fewer than {n} of {css}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `script` returns true in the page.
async fn wait_true(browser: &Client, script: &str) {
    let deadline = Instant::now() + SHOW;
    while browser.execute(script, vec![]).await.unwrap() != json!(true) {
        assert!(Instant::now() < deadline, "never true: {script}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The texts of the received messages in the open conversation.
async fn received_texts(browser: &Client) -> Vec<String> {
    let mut texts = Vec::new();
    for e in browser
        .find_all(Locator::Css("#messages li.msg.in .text"))
        .await
        .unwrap()
    {
        texts.push(e.text().await.unwrap());
    }
    texts
}

async fn screenshot(browser: &Client, name: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    let png = browser.screenshot().await.expect("a screenshot");
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

#[tokio::test(flavor = "current_thread")]
async fn two_browsers_and_a_terminal_chat() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A fixed web port, so the pages find the server again after its restart.
    let (listen, web) = web_address();
    let mut server = ServerProcess::start(&data, &["--web-listen", &listen]);
    assert!(server.logged(&format!("web client on {web}")));
    let driver = Driver::start(&chromedriver);

    let a = session(&driver, &chromium, 1000, 700).await;
    let b = session(&driver, &chromium, 390, 760).await;
    sign_in(&a, &web, 101).await;
    sign_in(&b, &web, 102).await;

    // A text from A to B.
    open_conversation(&a, 102).await;
    send_text(&a, "hello from the browser, ça va ?").await;
    open_listed(&b, 101).await;
    find(&b, "#messages li.msg.in .text").await;
    assert_eq!(
        received_texts(&b).await,
        ["hello from the browser, ça va ?"]
    );

    // A picture from B to A, picked as a file; A's page decodes and shows it.
    let picture = dir.path().join("picture.png");
    std::fs::write(&picture, png(96, 64)).unwrap();
    find(&b, "#file")
        .await
        .send_keys(picture.to_str().unwrap())
        .await
        .unwrap();
    find(&b, "#messages li.msg.out[data-status=sent] img").await;
    find(&a, "#messages li.msg.in img").await;
    let width = a
        .execute(
            "return document.querySelector('#messages li.msg.in img').naturalWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(width, json!(96), "the picture was decoded at its size");
    send_text(&b, "nice picture? it is a gradient").await;

    // A voice message recorded by B (the fake microphone's tone), playable on A's page.
    find(&b, "#record").await.click().await.unwrap();
    find(&b, "#record.recording").await;
    // The length of the recording, not a wait for anything.
    tokio::time::sleep(Duration::from_millis(700)).await;
    find(&b, "#record").await.click().await.unwrap();
    find(&b, "#messages li.msg.out[data-status=sent] audio").await;
    find(&a, "#messages li.msg.in audio").await;
    wait_true(
        &a,
        "return document.querySelector('#messages li.msg.in audio').readyState >= 1",
    )
    .await;

    // The terminal (chat-client, id 103) and browser A, both ways.
    let tcp = server.addr.as_str();
    let sent = chat_client(
        &["--server", tcp, "--id", "103", "--to", "101"],
        "hi from the terminal\n",
    );
    assert!(sent.status.success(), "{sent:?}");
    open_listed(&a, 103).await;
    find(&a, "#messages li.msg.in .text").await;
    assert_eq!(received_texts(&a).await, ["hi from the terminal"]);
    // A type the page cannot show is offered as a download.
    let file = dir.path().join("notes.bin");
    std::fs::write(&file, [1, 2, 3, 4]).unwrap();
    let sent = chat_client(
        &[
            "--server",
            tcp,
            "--id",
            "103",
            "--to",
            "101",
            "--type",
            "9",
            "--file",
            file.to_str().unwrap(),
        ],
        "",
    );
    assert!(sent.status.success(), "{sent:?}");
    let link = find(&a, "#messages li.msg.in a[download]").await;
    assert!(link.text().await.unwrap().contains("4 B"));
    send_text(&a, "hello terminal").await;
    let got = chat_client(&["--server", tcp, "--id", "103", "--receive", "1"], "");
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "[101] text: hello terminal\n"
    );

    // Back in the conversation with B for the screenshots.
    open_listed(&a, 102).await;
    find(&a, "#messages li.msg.in img").await;
    screenshot(&a, "a-desktop.png").await;
    screenshot(&b, "b-phone.png").await;

    // B closes its tab; a frame for it waits in its mailbox, across a server restart,
    // which A's page reports in plain words and recovers from by itself.
    b.close().await.unwrap();
    let sent = chat_client(
        &["--server", &server.addr, "--id", "103", "--to", "102"],
        "sent while your tab was closed\n",
    );
    assert!(sent.status.success(), "{sent:?}");
    server.signal(libc::SIGTERM);
    assert!(server.wait().success());
    wait_true(
        &a,
        "return document.getElementById('banner-text').textContent.includes('restarting')",
    )
    .await;
    let server = ServerProcess::start(&data, &["--web-listen", &listen]);
    find(&a, "#status.online").await;

    let b = session(&driver, &chromium, 390, 760).await;
    sign_in(&b, &web, 102).await;
    open_listed(&b, 103).await;
    find(&b, "#messages li.msg.in .text").await;
    assert_eq!(received_texts(&b).await, ["sent while your tab was closed"]);
    // The reconnected A still reaches B, whose new tab also shows what came before
    // it from the server's history.
    send_text(&a, "you are back").await;
    find(&b, "#back").await.click().await.unwrap();
    open_listed(&b, 101).await;
    wait_count(&b, "#messages li.msg.in .text", 2).await;
    assert_eq!(
        received_texts(&b).await,
        ["hello from the browser, ça va ?", "you are back"]
    );

    // The terminal as 102 too: it does not sign the tab out, and both get A's next
    // message (the terminal binds once first, so frames wait for it as well).
    let once = chat_client(&["--server", &server.addr, "--id", "102"], "");
    assert!(once.status.success(), "{once:?}");
    send_text(&a, "to the tab and the terminal").await;
    wait_count(&b, "#messages li.msg.in .text", 3).await;
    let got = chat_client(
        &["--server", &server.addr, "--id", "102", "--receive", "1"],
        "",
    );
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "[101] text: to the tab and the terminal\n"
    );
    find(&b, "#status.online").await;
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// With auth on, the page asks for a token, refuses a wrong one in words, and signs in
/// with the right one.
#[tokio::test(flavor = "current_thread")]
async fn the_page_signs_in_with_a_token_when_auth_is_on() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let phrase = "correct horse battery staple";
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &["--web-listen", "127.0.0.1:0", "--auth-secret", phrase],
    );
    let web = server
        .logs
        .lock()
        .unwrap()
        .iter()
        .find_map(|line| {
            let rest = line.split("web client on ").nth(1)?;
            Some(rest.split(',').next()?.to_string())
        })
        .expect("the server logged its web address");
    let driver = Driver::start(&chromedriver);
    let page = session(&driver, &chromium, 800, 600).await;
    page.goto(&web).await.expect("the page loads");
    let secret = chat::auth::Secret::new(phrase).unwrap();

    find(&page, "#token-label:not([hidden])").await;
    find(&page, "#my-id").await.send_keys("201").await.unwrap();
    let token = find(&page, "#token").await;
    token.send_keys(&secret.token(202)).await.unwrap();
    find(&page, "#signin-button").await.click().await.unwrap();
    wait_true(
        &page,
        "return document.getElementById('signin-error').textContent.startsWith('Sign-in refused')",
    )
    .await;

    let token = find(&page, "#token").await;
    token.clear().await.unwrap();
    token.send_keys(&secret.token(201)).await.unwrap();
    find(&page, "#signin-button").await.click().await.unwrap();
    find(&page, "#status.online").await;
    page.close().await.unwrap();
}

/// An RGB PNG of a colour gradient, uncompressed (stored deflate blocks).
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    for y in 0..height {
        raw.push(0); // filter: none
        for x in 0..width {
            raw.extend([(x * 255 / width) as u8, (y * 255 / height) as u8, 200]);
        }
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend(len.to_le_bytes());
        zlib.extend((!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (mut s1, mut s2) = (1u32, 0u32);
    for &byte in &raw {
        s1 = (s1 + u32::from(byte)) % 65_521;
        s2 = (s2 + s1) % 65_521;
    }
    zlib.extend(((s2 << 16) | s1).to_be_bytes());

    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(*b"IHDR", ihdr), (*b"IDAT", zlib), (*b"IEND", Vec::new())] {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(&data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The page says in plain words why a message was not sent (`mailbox-full`,
/// `store-failed`) and marks it failed; a message written while the server is away is
/// sent once the page is back, and arrives once.
#[tokio::test(flavor = "current_thread")]
async fn the_page_explains_refusals_and_sends_again_after_reconnecting() {
    use std::sync::atomic::Ordering;
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    // A fixed web port, so the page finds the server again after its restart.
    let (listen, web) = web_address();
    let faults = std::sync::Arc::new(chat::store::Faults::default());
    let configure = |c: &mut chat::server::Config| {
        c.web_listen = Some(listen.clone());
        c.mailbox.max_messages = 1;
        c.store_faults = Some(faults.clone());
    };
    let server = start_in(tempfile::tempdir().expect("temp dir"), configure).await;
    let driver = Driver::start(&chromedriver);
    let a = session(&driver, &chromium, 1000, 700).await;
    sign_in(&a, &web, 121).await;
    let failed = "#messages li.msg.out[data-status=failed]";
    let banner_says = |words: &str| {
        format!("return document.getElementById('banner-text').textContent.includes('{words}')")
    };

    // 122 is offline and its mailbox holds one frame: the second is refused.
    open_conversation(&a, 122).await;
    send_text(&a, "fits").await;
    type_and_send(&a, "one too many").await;
    wait_count(&a, failed, 1).await;
    wait_true(&a, &banner_says("their mailbox is full")).await;
    let meta = find(&a, &format!("{failed} .meta"))
        .await
        .text()
        .await
        .unwrap();
    assert!(meta.contains("their mailbox is full"), "{meta}");

    // The store's writes fail: the next is refused with store-failed.
    faults.fail_write.store(true, Ordering::Relaxed);
    open_conversation(&a, 123).await;
    type_and_send(&a, "while the disk fails").await;
    wait_count(&a, failed, 1).await;
    wait_true(&a, &banner_says("could not store it")).await;
    faults.fail_write.store(false, Ordering::Relaxed);

    // The server goes away; a message written meanwhile waits, and is sent on return.
    let data = server.stop_keeping_data().await;
    wait_true(
        &a,
        "return !document.getElementById('status').classList.contains('online')",
    )
    .await;
    type_and_send(&a, "written while away").await;
    find(&a, "#messages li.msg.out[data-status=sending]").await;
    let server = start_in(data, configure).await;
    find(&a, "#status.online").await;
    find(&a, "#messages li.msg.out[data-status=sent]").await;
    let tcp = server.addr();
    let got = chat_client(
        &[
            "--server",
            &tcp,
            "--id",
            "123",
            "--receive",
            "1",
            "--timeout",
            "5",
        ],
        "",
    );
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "[121] text: written while away\n"
    );
    // Once: nothing else waits for 123.
    let more = chat_client(
        &[
            "--server",
            &tcp,
            "--id",
            "123",
            "--receive",
            "1",
            "--timeout",
            "1",
        ],
        "",
    );
    assert!(!more.status.success(), "{more:?}");
    a.close().await.unwrap();
}

/// Two browsers signed in as one id are online together; the conversation is loaded
/// from the server's history after a reload, older messages come in as the reader
/// scrolls up, what one tab sends shows in the other, and reading on one tab clears
/// the unread count on the other.
#[tokio::test(flavor = "current_thread")]
async fn two_tabs_of_one_id_share_history_and_read_markers() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (listen, web) = web_address();
    let server = ServerProcess::start(&data, &["--web-listen", &listen]);
    let driver = Driver::start(&chromedriver);
    let one = session(&driver, &chromium, 1000, 700).await;
    let two = session(&driver, &chromium, 1000, 700).await;
    sign_in(&one, &web, 201).await;
    sign_in(&two, &web, 201).await;

    // 45 messages from the terminal (id 202): both tabs list the conversation with 45
    // unread.
    let lines: String = (0..45).map(|i| format!("m{i:02}\n")).collect();
    let sent = chat_client(
        &["--server", &server.addr, "--id", "202", "--to", "201"],
        &lines,
    );
    assert!(sent.status.success(), "{sent:?}");
    let badge = "return (document.querySelector(\"#conversations button[data-peer='202'] .unread\") || {}).textContent === '45'";
    for tab in [&one, &two] {
        wait_true(tab, badge).await;
    }

    // Tab one reads: it shows the newest page, older ones as it scrolls up, and tab
    // two's count goes to nothing.
    open_listed(&one, 202).await;
    wait_count(&one, "#messages li.msg.in .text", 30).await;
    let scroll_up = "const l = document.getElementById('messages'); l.scrollTop = 0; \
                     l.dispatchEvent(new Event('scroll')); return document.querySelectorAll('#messages li.msg.in').length";
    let deadline = Instant::now() + SHOW;
    while one.execute(scroll_up, vec![]).await.unwrap() != json!(45) {
        assert!(Instant::now() < deadline, "older messages never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let texts = received_texts(&one).await;
    let want: Vec<String> = (0..45).map(|i| format!("m{i:02}")).collect();
    assert_eq!(texts, want, "in order, once each");
    wait_true(
        &two,
        "return document.querySelector(\"#conversations button[data-peer='202'] .unread\") === null",
    )
    .await;

    // Tab one answers; tab two shows it as its own, sent.
    send_text(&one, "answer from tab one").await;
    open_listed(&two, 202).await;
    wait_true(
        &two,
        "return [...document.querySelectorAll('#messages li.msg.out .text')].some((e) => e.textContent === 'answer from tab one')",
    )
    .await;

    // Tab two reloads: the same conversation, from the server, with both sides (the
    // newest page: the answer and the 29 messages before it).
    two.refresh().await.unwrap();
    find(&two, "#status.online").await;
    open_listed(&two, 202).await;
    wait_count(&two, "#messages li.msg .text", 30).await;
    wait_true(
        &two,
        "return [...document.querySelectorAll('#messages li.msg.out .text')].some((e) => e.textContent === 'answer from tab one')",
    )
    .await;
    for tab in [&one, &two] {
        find(tab, "#status.online").await;
    }
    one.close().await.unwrap();
    two.close().await.unwrap();
}
