//! A client that gives up on a stuck write, connects again and writes the same blocks
//! anew must not see its newer write undone when the stuck one finally lands: the new
//! connection is served only after the broken connection's requests have ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use osstream_core::{BootProtocol, Exports, ServeContext};
use osstream_nbd::{NbdConfig, NbdServer};
use osstream_testkit::{InstrumentedSource, MemSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const BLOCK: usize = 4096;
const STALL: Duration = Duration::from_millis(1500);

/// Opens export `disk` with NBD_OPT_EXPORT_NAME (no zero padding): the simplest attach.
async fn attach(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    stream.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut option = Vec::new();
    option.extend_from_slice(b"IHAVEOPT");
    option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    option.extend_from_slice(&4u32.to_be_bytes());
    option.extend_from_slice(b"disk");
    stream.write_all(&option).await.unwrap();
    let mut export = [0u8; 10]; // size, transmission flags
    stream.read_exact(&mut export).await.unwrap();
    stream
}

async fn send(
    stream: &mut TcpStream,
    command: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
    len: u32,
) {
    let mut frame = Vec::with_capacity(28 + data.len());
    frame.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(&command.to_be_bytes());
    frame.extend_from_slice(&cookie.to_be_bytes());
    frame.extend_from_slice(&offset.to_be_bytes());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(data);
    stream.write_all(&frame).await.unwrap();
}

/// Reads one simple reply with `payload` bytes of data; returns (error, cookie, data).
async fn reply(stream: &mut TcpStream, payload: usize) -> (u32, u64, Vec<u8>) {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).await.unwrap();
    assert_eq!(header[..4], 0x6744_6698u32.to_be_bytes());
    let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 { payload } else { 0 }];
    stream.read_exact(&mut data).await.unwrap();
    (error, cookie, data)
}

async fn read_block(stream: &mut TcpStream) -> Vec<u8> {
    send(stream, 0, 9, 0, &[], BLOCK as u32).await;
    let (error, _, data) = reply(stream, BLOCK).await;
    assert_eq!(error, 0);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_write_on_a_new_connection_is_not_undone_by_a_stuck_one() {
    let image = Arc::new(MemSource::writable("disk", vec![0u8; 1 << 20]));
    let source = InstrumentedSource::builder(image.clone())
        .stall_writes(2, STALL)
        .build();
    let mut nbd = NbdServer::new(NbdConfig {
        listen: vec!["127.0.0.1:0".into()],
        base_exports: Some(true),
        default_export: Some("disk".into()),
        cpu_local: false,
        ..NbdConfig::default()
    });
    let address = nbd.bind().await.unwrap().remove(0);
    let shutdown = CancellationToken::new();
    let ctx = ServeContext::exports_only(Arc::new(Exports::single("disk", "test disk", source)));
    let server = tokio::spawn(Box::new(nbd).serve(ctx, shutdown.clone()));

    // A connection that starts while another is live (multi-conn) is not held up by the
    // live one's stuck write.
    let mut live = attach(&address).await;
    send(&mut live, 1, 1, 0, &[b'l'; BLOCK], BLOCK as u32).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let mut other = attach(&address).await;
    read_block(&mut other).await;
    assert!(
        started.elapsed() < STALL / 2,
        "a live connection held up another"
    );
    assert_eq!(reply(&mut live, 0).await.0, 0);
    drop((live, other));

    // The next write gets stuck too; the client gives up on that connection.
    let mut old = attach(&address).await;
    send(&mut old, 1, 1, 0, &[b'o'; BLOCK], BLOCK as u32).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(old);

    // It connects again and writes the same block anew (a newer version of it).
    let started = Instant::now();
    let mut new = attach(&address).await;
    send(&mut new, 1, 2, 0, &[b'n'; BLOCK], BLOCK as u32).await;
    assert_eq!(reply(&mut new, 0).await.0, 0);
    assert!(
        started.elapsed() >= STALL - Duration::from_millis(300),
        "the new connection was served before the stuck write ended ({:?})",
        started.elapsed()
    );
    assert_eq!(read_block(&mut new).await, vec![b'n'; BLOCK]);
    // Nothing of the old connection is left to land later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_block(&mut new).await, vec![b'n'; BLOCK]);
    assert_eq!(image.snapshot()[..BLOCK], [b'n'; BLOCK]);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
