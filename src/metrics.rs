//! `/metrics` for Prometheus: what the engine and protocols count
//! ([`osstream_core::metrics`]), plus what this server reads at scrape time: each layer's
//! counters (cache tiers, hedging, boot profiles) and its live sessions' write overlays.
//! Served on `[metrics] listen` (a listener of its own) and/or the HTTP listener
//! (`[http] metrics = true`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use osstream_core::metrics::{Exposition, global};
use osstream_core::{CancellationToken, Error, Exports, Layer, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Layer counters that are levels, not running totals.
const GAUGES: &[&str] = &["entries", "bytes", "capacity"];

/// Registers the scrape-time families of this server: `layers`' counters and the live
/// sessions' overlays of `exports` (limited to `ram_limit` bytes in RAM each).
pub fn register(layers: Vec<Arc<dyn Layer>>, exports: Arc<Exports>, ram_limit: u64) {
    global().add_collector(move |out| render_layers(&layers, out));
    global().add_collector(move |out| render_overlays(&exports, ram_limit, out));
}

/// A family of layer counters: a gauge or not, and (tier, value) samples.
type Family = (bool, Vec<(Option<String>, u64)>);

/// `cache:ram` counters become `osstream_cache_hits_total{tier="ram"}`; other layers'
/// (`hedge`, `profile`) `osstream_hedge_reads_total`...
fn render_layers(layers: &[Arc<dyn Layer>], out: &mut Exposition) {
    // By family, so each family's samples come together.
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for report in layers.iter().filter_map(|l| l.report()) {
        let (prefix, tier) = match report.layer.split_once(':') {
            Some((kind, tier)) => (kind.to_owned(), Some(tier.to_owned())),
            None => (report.layer.clone(), None),
        };
        for (counter, value) in &report.counters {
            let gauge = GAUGES.contains(&counter.as_str());
            let name = if gauge {
                format!("osstream_{prefix}_{counter}")
            } else {
                format!("osstream_{prefix}_{counter}_total")
            };
            families
                .entry(name)
                .or_insert_with(|| (gauge, Vec::new()))
                .1
                .push((tier.clone(), *value));
        }
    }
    for (name, (gauge, samples)) in families {
        let (kind, help) = if gauge {
            ("gauge", "A layer's level now (see `osstream cache stats`).")
        } else {
            (
                "counter",
                "A layer's count since the server started (see `osstream cache stats`).",
            )
        };
        out.family(&name, kind, help);
        for (tier, value) in samples {
            match &tier {
                Some(tier) => out.sample(&name, &[("tier", tier)], value),
                None => out.sample(&name, &[], value),
            }
        }
    }
}

fn render_overlays(exports: &Exports, ram_limit: u64, out: &mut Exposition) {
    let usage = exports.overlay_usage();
    out.family(
        "osstream_session_overlay_bytes",
        "gauge",
        "Bytes a live session's write overlay holds on this server, in RAM or on its disk.",
    );
    for u in &usage {
        for (place, bytes) in [("ram", u.ram), ("disk", u.disk)] {
            let labels = [
                ("session", u.session.as_str()),
                ("client", u.client.as_str()),
                ("place", place),
            ];
            out.sample("osstream_session_overlay_bytes", &labels, bytes);
        }
    }
    out.family(
        "osstream_session_overlay_ram_limit_bytes",
        "gauge",
        "RAM one session's overlay may use ([sessions] ram_capacity); beyond it a ram overlay answers ENOSPC.",
    );
    out.sample("osstream_session_overlay_ram_limit_bytes", &[], ram_limit);
}

/// The response to one scrape request line: `/metrics` or a 404.
pub fn response(request_line: &str) -> Vec<u8> {
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body, kind) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            global().render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "only /metrics is served here\n".to_owned(),
            "text/plain",
        ),
        _ => (
            "405 Method Not Allowed",
            "GET /metrics\n".to_owned(),
            "text/plain",
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut reply = head.into_bytes();
    if method != "HEAD" {
        reply.extend_from_slice(body.as_bytes());
    }
    reply
}

/// Binds `[metrics] listen`; the returned listener is served by [`serve`].
pub async fn bind(address: &str) -> Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        Error::from_io(
            e,
            format!("cannot listen on metrics.listen = {address:?} (in use, or not an address of this host?)"),
        )
        .with_op("bind")
    })
}

/// Answers scrapes on `listener` until `stop`.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let answer = async {
                let mut request = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&request);
                let line = text.lines().next().unwrap_or("");
                stream.write_all(&response(line)).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
        });
    }
}
