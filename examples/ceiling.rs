//! The ceiling for benchmarks: the same protocol with no broker, no channels, no
//! mailbox. One task per connection reads what is available, and writes the echoes of
//! every complete frame in it with one write. Forwarding is not possible here, so pair
//! mode has no ceiling; compare it with chat-server's own echo figure instead.
//!
//!     cargo run --release --example ceiling -- 127.0.0.1:9999

use futures::{AsyncReadExt, AsyncWriteExt};

use chat::protocol::{DEFAULT_MAX_FRAME_BYTES, FrameBuf};
use chat::rt::{self, TcpListener, TcpStream};

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9999".into());
    rt::block_on(async {
        let listener = match TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ceiling: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!("ceiling listening on {addr}");
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                rt::spawn(serve(stream));
            }
        }
    });
}

async fn serve(mut stream: TcpStream) {
    let mut buf = FrameBuf::new();
    let mut out = Vec::new();
    loop {
        match stream.read(buf.space()).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.filled(n),
        }
        out.clear();
        loop {
            match buf.decode_client(DEFAULT_MAX_FRAME_BYTES) {
                Ok(Some(frame)) => out.extend_from_slice(&frame.wire),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}
