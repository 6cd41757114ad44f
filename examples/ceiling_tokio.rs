//! The fastest ceiling we could write for this protocol on this machine: tokio's
//! multi-thread runtime (work-stealing, one worker per core, epoll underneath), 64 KiB
//! buffers, and no code shared with chat-server. Each connection's task reads what is
//! available, turns every complete client frame into its server-format echo in one
//! output buffer, and writes that with one call. No broker, no store, no forwarding,
//! so it bounds what any server of this protocol could do here (echo mode only).
//!
//!     cargo run --release --example ceiling_tokio -- 127.0.0.1:9998

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 64 * 1024;
const CLIENT_HEADER: usize = 13;
const MAX_BODY: usize = 8 * 1024 * 1024;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9998".into());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ceiling_tokio: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ceiling_tokio: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!("ceiling_tokio listening on {addr}");
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream));
            }
        }
    });
}

async fn serve(mut stream: TcpStream) {
    let mut inbuf = vec![0u8; BUF];
    let mut filled = 0;
    let mut out = Vec::with_capacity(BUF);
    loop {
        if filled == inbuf.len() {
            inbuf.resize(inbuf.len() * 2, 0);
        }
        match stream.read(&mut inbuf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        out.clear();
        let mut pos = 0;
        while filled - pos >= CLIENT_HEADER {
            let h = &inbuf[pos..pos + CLIENT_HEADER];
            let len = u32::from_be_bytes([h[9], h[10], h[11], h[12]]) as usize;
            if len > MAX_BODY {
                return;
            }
            let end = pos + CLIENT_HEADER + len;
            if end > filled {
                if end - pos > inbuf.len() {
                    inbuf.resize(end - pos, 0);
                }
                break;
            }
            out.extend_from_slice(&h[0..4]); // sender
            out.push(h[8]); // type
            out.extend_from_slice(&h[9..13]); // length
            out.extend_from_slice(&inbuf[pos + CLIENT_HEADER..end]);
            pos = end;
        }
        inbuf.copy_within(pos..filled, 0);
        filled -= pos;
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}
