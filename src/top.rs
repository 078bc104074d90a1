//! `osstream top`: a live table of the clients a running server serves — each session
//! (or plain-name reader) with its vdisk, connections, bytes, rates and boot progress —
//! from the server's `<data_dir>/stats.json` and the catalog's live sessions.

use std::collections::{BTreeMap, HashMap};

use osstream_catalog::{Catalog, Client, Mac, Session, SqlCatalog};
use osstream_core::live::{LiveAttachment, SessionBoot};
use osstream_core::{ByteSize, Result};
use serde::Serialize;

use crate::args::TopArgs;
use crate::config::Config;
use crate::output::{json_text, table};
use crate::stats::Stats;

/// Runs `osstream top`.
pub async fn run(config: &Config, args: &TopArgs, json: bool) -> Result<()> {
    // The server first: with none running, the catalog's sessions show nothing live, and
    // "no server ran here" is the message the admin needs.
    crate::stats::read_running(&config.data_dir)?;
    let catalog = crate::wiring::open_existing_catalog(config).await?;
    let mut top = Top {
        catalog,
        data_dir: config.data_dir.clone(),
        rates: Rates::default(),
        json,
        once: args.refresh.once,
        live_note: crate::watch::live_note(&args.refresh),
    };
    crate::watch::run(&mut top, &args.refresh, json).await
}

struct Top {
    catalog: SqlCatalog,
    data_dir: std::path::PathBuf,
    rates: Rates,
    json: bool,
    once: bool,
    /// How the view refreshes and how to leave it; `None` with `--once`.
    live_note: Option<String>,
}

impl crate::watch::Screen for Top {
    async fn compose(&mut self) -> Result<String> {
        let stats = crate::stats::read_running(&self.data_dir)?;
        let sessions = self.catalog.sessions(false).await?;
        let clients = self.catalog.clients().await?;
        let server_name = self
            .catalog
            .servers()
            .await?
            .into_iter()
            .find(|s| s.id == stats.server)
            .map(|s| s.name);
        let rates = self.rates.update(stats.updated_at, &stats.attachments);
        let view = View::new(
            &stats,
            server_name,
            &sessions,
            &clients,
            &rates,
            crate::stats::now_ms(),
        );
        if self.json {
            // One document per line while watching: a stream a line reader can follow.
            return Ok(json_text(&view, self.once)? + "\n");
        }
        Ok(view.render(self.live_note.as_deref()))
    }
}

/// Identifies one attachment across refreshes.
fn attachment_key(a: &LiveAttachment) -> String {
    format!("{} {} {} {}", a.protocol, a.peer, a.export, a.connected_at)
}

/// Bytes per second read and written, as measured between two samples of the server.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Rate {
    pub read: f64,
    pub written: f64,
}

/// Bytes read and written so far, by [`attachment_key`].
type ByteCounts = HashMap<String, (u64, u64)>;

/// Each attachment's rate between the last two samples the server wrote.
#[derive(Debug, Default)]
pub struct Rates {
    /// The last sample: when the server counted (Unix ms), and each attachment's bytes.
    previous: Option<(i64, ByteCounts)>,
    /// The rates computed from it, shown again until the server writes a newer sample.
    last: HashMap<String, Rate>,
}

impl Rates {
    /// Takes the sample the server counted at `updated_at` (its clock, so a late read of
    /// the file does not skew the rate); returns each attachment's rate since the previous
    /// sample, by [`attachment_key`]. Empty at the first sample: no rate is known yet.
    pub fn update(&mut self, updated_at: i64, attachments: &[LiveAttachment]) -> RateSample {
        let counts: ByteCounts = attachments
            .iter()
            .map(|a| (attachment_key(a), (a.read_bytes, a.written_bytes)))
            .collect();
        match &self.previous {
            None => {}
            // The file was not rewritten since: the rates of the last interval stand.
            Some((at, _)) if *at == updated_at => {
                return RateSample {
                    known: true,
                    rates: self.last.clone(),
                };
            }
            Some((at, before)) => {
                self.last = attachments
                    .iter()
                    .filter_map(|a| {
                        let key = attachment_key(a);
                        // A connection new since the last sample moved its bytes since
                        // it connected.
                        let (read, written, since) = match before.get(&key) {
                            Some(&(read, written)) => (read, written, *at),
                            None => (0, 0, (*at).max(a.connected_at)),
                        };
                        let seconds = (updated_at - since) as f64 / 1000.0;
                        (seconds > 0.0).then(|| {
                            let rate = Rate {
                                read: a.read_bytes.saturating_sub(read) as f64 / seconds,
                                written: a.written_bytes.saturating_sub(written) as f64 / seconds,
                            };
                            (key, rate)
                        })
                    })
                    .collect();
            }
        }
        let known = self.previous.is_some();
        self.previous = Some((updated_at, counts));
        RateSample {
            known,
            rates: self.last.clone(),
        }
    }
}

/// What [`Rates::update`] found.
#[derive(Debug, Default)]
pub struct RateSample {
    /// Whether there was an earlier sample to compare with.
    known: bool,
    rates: HashMap<String, Rate>,
}

impl RateSample {
    /// The summed rate of `attachments`; `None` before a second sample.
    fn of<'a>(&self, attachments: impl IntoIterator<Item = &'a LiveAttachment>) -> Option<Rate> {
        self.known.then(|| {
            attachments
                .into_iter()
                .filter_map(|a| self.rates.get(&attachment_key(a)))
                .fold(Rate::default(), |sum, r| Rate {
                    read: sum.read + r.read,
                    written: sum.written + r.written,
                })
        })
    }
}

/// How far a client's boot got.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Boot {
    /// Not complete yet, `seconds` after the session first attached.
    Booting { seconds: f64 },
    /// Complete, `seconds` after the session first attached.
    Booted { seconds: f64 },
    /// Not known: a plain-name reader, a session with no connection here, or a server
    /// that does not watch boots (`[profile]` off).
    Unknown,
}

impl Boot {
    fn of(boot: Option<&SessionBoot>, watched: bool, now: i64) -> Boot {
        match boot {
            _ if !watched => Boot::Unknown,
            Some(SessionBoot {
                boot_seconds: Some(seconds),
                ..
            }) => Boot::Booted { seconds: *seconds },
            Some(SessionBoot {
                first_attached_at: Some(at),
                ..
            }) => Boot::Booting {
                seconds: (now - at).max(0) as f64 / 1000.0,
            },
            _ => Boot::Unknown,
        }
    }

    fn describe(self) -> String {
        match self {
            Boot::Booting { seconds } => format!("booting {}", duration(seconds as i64)),
            Boot::Booted { seconds } if seconds < 60.0 => format!("booted in {seconds:.1}s"),
            Boot::Booted { seconds } => format!("booted in {}", duration(seconds as i64)),
            Boot::Unknown => "-".to_owned(),
        }
    }
}

/// `seconds` for people: `45s`, `12m03s`, `3h04m`, `2d03h`.
pub fn duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes per second for people (`12MiB/s`); `-` when not known yet.
fn rate(bytes_per_second: Option<f64>) -> String {
    bytes_per_second.map_or_else(
        || "-".to_owned(),
        |r| format!("{}/s", ByteSize(r.round() as u64).human()),
    )
}

/// One row: a session (all its connections here), or one plain-name attachment.
#[derive(Debug, Serialize)]
struct Row {
    /// The client's MAC; `None` for a plain-name reader.
    client: Option<String>,
    name: Option<String>,
    hostname: Option<String>,
    session: Option<String>,
    /// The vdisk, or the image name a plain-name reader asked for.
    vdisk: String,
    protocols: Vec<String>,
    peers: Vec<String>,
    /// Connections open now.
    connections: usize,
    /// When its oldest open connection attached (Unix ms).
    connected_at: Option<i64>,
    /// When its last connection closed, for a session without one now (Unix ms).
    detached_at: Option<i64>,
    /// Bytes moved: by its open connections, plus (sessions) the ones that closed.
    read_bytes: u64,
    written_bytes: u64,
    /// Bytes per second since the previous refresh; `None` at the first.
    read_rate: Option<f64>,
    write_rate: Option<f64>,
    requests: u64,
    errors: u64,
    boot: Boot,
}

#[derive(Debug, Serialize)]
struct TierHits {
    tier: String,
    hits: u64,
    misses: u64,
    /// Hits over lookups; `None` before the first lookup.
    hit_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Totals {
    sessions: usize,
    connections: usize,
    read_bytes: u64,
    written_bytes: u64,
    read_rate: Option<f64>,
    write_rate: Option<f64>,
}

/// One refresh of `osstream top` (its `--json` document).
#[derive(Debug, Serialize)]
struct View {
    /// The server's id in the catalog, and its host name when the catalog has it.
    server: String,
    server_name: Option<String>,
    pid: u32,
    /// When the server counted (Unix ms).
    updated_at: i64,
    /// Whether the server detects boots (boot profiles on); otherwise every boot is
    /// `unknown`.
    boots_watched: bool,
    totals: Totals,
    /// Each cache tier, nearest the client first.
    cache: Vec<TierHits>,
    clients: Vec<Row>,
}

impl View {
    /// Joins the server's sample with the catalog: one row per session this server
    /// holds (or nobody holds yet) and per plain-name attachment.
    fn new(
        stats: &Stats,
        server_name: Option<String>,
        sessions: &[Session],
        clients: &[Client],
        rates: &RateSample,
        now: i64,
    ) -> View {
        let boots_watched = stats.layers.iter().any(|l| l.layer == "profile");
        let mac_of = |text: &str| {
            text.parse::<Mac>()
                .map_or_else(|_| text.to_owned(), |m| m.to_string())
        };
        let known: HashMap<String, &Client> =
            clients.iter().map(|c| (c.mac.to_string(), c)).collect();
        let mut by_session: BTreeMap<&str, Vec<&LiveAttachment>> = BTreeMap::new();
        let mut readers = Vec::new();
        for a in &stats.attachments {
            match &a.session {
                Some(session) => by_session.entry(session).or_default().push(a),
                None => readers.push(a),
            }
        }
        // Sessions of other servers sharing the catalog have no counts here.
        let held: Vec<&Session> = sessions
            .iter()
            .filter(|s| s.owner.as_ref().is_none_or(|owner| *owner == stats.server))
            .collect();
        let mut ids: Vec<&str> = held.iter().map(|s| s.id.as_str()).collect();
        ids.extend(by_session.keys().copied());
        ids.sort_unstable();
        ids.dedup();
        let mut rows: Vec<Row> = ids
            .into_iter()
            .map(|id| {
                let record = held.iter().find(|s| s.id == id);
                let open = by_session.get(id).map_or(&[][..], Vec::as_slice);
                let client = record
                    .map(|s| s.mac.to_string())
                    .or_else(|| open.iter().find_map(|a| a.client.as_deref().map(mac_of)));
                let who = client.as_ref().and_then(|mac| known.get(mac));
                let vdisk = record
                    .map(|s| s.vdisk.clone())
                    .or_else(|| open.iter().find_map(|a| a.vdisk.clone()))
                    .unwrap_or_default();
                let mut row = Row::of(open, rates);
                // The catalog counts a session's connections that closed.
                if let Some(record) = record {
                    row.read_bytes += record.bytes_read;
                    row.written_bytes += record.bytes_written;
                    if open.is_empty() {
                        row.peers.extend(record.peer.clone());
                        row.detached_at = record.detached_at;
                    }
                }
                row.client = client;
                row.name = who.and_then(|c| c.name.clone());
                row.hostname = who.and_then(|c| c.hostname.clone());
                row.session = Some(id.to_owned());
                row.vdisk = vdisk;
                row.boot = if open.is_empty() {
                    Boot::Unknown
                } else {
                    Boot::of(
                        stats.sessions.iter().find(|b| b.session == id),
                        boots_watched,
                        now,
                    )
                };
                row
            })
            .collect();
        rows.sort_by(|a, b| (&a.client, &a.vdisk).cmp(&(&b.client, &b.vdisk)));
        for reader in readers {
            let mut row = Row::of(&[reader], rates);
            row.vdisk = reader.export.clone();
            rows.push(row);
        }
        let cache = stats
            .layers
            .iter()
            .rev()
            .filter_map(|r| {
                let tier = r.layer.strip_prefix("cache:")?;
                let (hits, misses) = (r.get("hits").unwrap_or(0), r.get("misses").unwrap_or(0));
                Some(TierHits {
                    tier: tier.to_owned(),
                    hits,
                    misses,
                    hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
                })
            })
            .collect();
        let sum_rate = |pick: fn(&Row) -> Option<f64>| {
            rates
                .known
                .then(|| rows.iter().filter_map(pick).sum::<f64>())
        };
        let totals = Totals {
            sessions: rows.iter().filter(|r| r.session.is_some()).count(),
            connections: stats.attachments.len(),
            read_bytes: rows.iter().map(|r| r.read_bytes).sum(),
            written_bytes: rows.iter().map(|r| r.written_bytes).sum(),
            read_rate: sum_rate(|r| r.read_rate),
            write_rate: sum_rate(|r| r.write_rate),
        };
        View {
            server: stats.server.clone(),
            server_name,
            pid: stats.pid,
            updated_at: stats.updated_at,
            boots_watched,
            totals,
            cache,
            clients: rows,
        }
    }

    /// The screen: two header lines, then the table. `quit` says how to leave a live view.
    fn render(&self, quit: Option<&str>) -> String {
        let now = crate::stats::now_ms();
        let server = match &self.server_name {
            Some(name) => format!("{name} ({})", self.server),
            None => self.server.clone(),
        };
        let age = (now - self.updated_at).max(0) / 1000;
        let mut text = format!(
            "osstream top: server {server}, pid {}, counted {age}s ago{}\n",
            self.pid,
            quit.map(|q| format!("; {q}")).unwrap_or_default()
        );
        let t = &self.totals;
        let cache = if self.cache.is_empty() {
            "no cache tier".to_owned()
        } else {
            let tiers: Vec<String> = self
                .cache
                .iter()
                .map(|c| match c.hit_ratio {
                    Some(ratio) => format!("{} {:.1}%", c.tier, 100.0 * ratio),
                    None => format!("{} -", c.tier),
                })
                .collect();
            format!("cache hit ratio {}", tiers.join(", "))
        };
        text += &format!(
            "{} session(s), {} connection(s); read {} ({}), written {} ({}); {cache}{}\n\n",
            t.sessions,
            t.connections,
            ByteSize(t.read_bytes).human(),
            rate(t.read_rate),
            ByteSize(t.written_bytes).human(),
            rate(t.write_rate),
            if self.boots_watched {
                ""
            } else {
                "; boot progress unknown: [profile] is off"
            }
        );
        let rows: Vec<Vec<String>> = self
            .clients
            .iter()
            .map(|r| {
                let client = match (&r.client, r.hostname.as_ref().or(r.name.as_ref())) {
                    (Some(mac), Some(name)) => format!("{mac} {name}"),
                    (Some(mac), None) => mac.clone(),
                    (None, _) => "-".to_owned(),
                };
                let peer = match r.peers.as_slice() {
                    [] => "-".to_owned(),
                    [one] => one.clone(),
                    [first, more @ ..] => format!("{first} +{}", more.len()),
                };
                let connected = match (r.connected_at, r.detached_at) {
                    (Some(at), _) => duration((now - at) / 1000),
                    (None, Some(at)) => format!("left {} ago", duration((now - at) / 1000)),
                    (None, None) => "waiting".to_owned(),
                };
                vec![
                    client,
                    r.vdisk.clone(),
                    if r.protocols.is_empty() {
                        "-".to_owned()
                    } else {
                        r.protocols.join(",")
                    },
                    peer,
                    connected,
                    ByteSize(r.read_bytes).human(),
                    ByteSize(r.written_bytes).human(),
                    rate(r.read_rate),
                    rate(r.write_rate),
                    r.boot.describe(),
                ]
            })
            .collect();
        text += &table(
            &[
                "CLIENT",
                "VDISK",
                "PROTOCOL",
                "PEER",
                "CONNECTED",
                "READ",
                "WRITTEN",
                "READ/S",
                "WRITE/S",
                "BOOT",
            ],
            &rows,
        );
        if self.clients.is_empty() {
            text += "(no client is connected and no session is open)\n";
        }
        text
    }
}

impl Row {
    /// The row of `open` attachments (one session's, or one reader): what they moved.
    fn of(open: &[&LiveAttachment], rates: &RateSample) -> Row {
        let mut protocols: Vec<String> = open.iter().map(|a| a.protocol.clone()).collect();
        protocols.sort_unstable();
        protocols.dedup();
        let mut peers: Vec<String> = Vec::new();
        for a in open {
            if !peers.contains(&a.peer) {
                peers.push(a.peer.clone());
            }
        }
        // A session with no connection here moves nothing: no rate, rather than 0 B/s.
        let rate = if open.is_empty() {
            None
        } else {
            rates.of(open.iter().copied())
        };
        Row {
            client: None,
            name: None,
            hostname: None,
            session: None,
            vdisk: String::new(),
            protocols,
            peers,
            connections: open.len(),
            connected_at: open.iter().map(|a| a.connected_at).min(),
            detached_at: None,
            read_bytes: open.iter().map(|a| a.read_bytes).sum(),
            written_bytes: open.iter().map(|a| a.written_bytes).sum(),
            read_rate: rate.map(|r| r.read),
            write_rate: rate.map(|r| r.written),
            requests: open.iter().map(|a| a.requests).sum(),
            errors: open.iter().map(|a| a.errors).sum(),
            boot: Boot::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(peer: &str, connected_at: i64, read: u64, written: u64) -> LiveAttachment {
        LiveAttachment {
            protocol: "nbd".into(),
            peer: peer.into(),
            export: "s/abcdef...".into(),
            client: Some("aa:bb:cc:dd:ee:01".into()),
            session: Some("s1".into()),
            vdisk: Some("deb".into()),
            connected_at,
            requests: 0,
            read_bytes: read,
            written_bytes: written,
            errors: 0,
        }
    }

    #[test]
    fn rates_are_bytes_per_second_between_the_servers_samples() {
        let mut rates = Rates::default();
        let first = rates.update(10_000, &[attachment("a", 1_000, 100, 0)]);
        assert!(!first.known, "no rate before a second sample");
        assert_eq!(first.of(&[attachment("a", 1_000, 100, 0)]), None);
        // 2 s later: a read 4 MiB more; b connected 1 s before the sample and read 1 MiB.
        let now = [
            attachment("a", 1_000, 100 + (4 << 20), 2048),
            attachment("b", 11_000, 1 << 20, 0),
        ];
        let second = rates.update(12_000, &now);
        let a = second.of(&now[..1]).unwrap();
        assert_eq!((a.read, a.written), ((2 << 20) as f64, 1024.0));
        let b = second.of(&now[1..]).unwrap();
        assert_eq!(b.read, (1 << 20) as f64);
        assert_eq!(second.of(&now).unwrap().read, (3 << 20) as f64);
        // The file not rewritten yet: the same rates, not zero.
        let again = rates.update(12_000, &now);
        assert_eq!(again.of(&now).unwrap().read, (3 << 20) as f64);
        // Counts that went down (a reconnect under the same key) give no negative rate.
        let later = [attachment("a", 1_000, 0, 0)];
        assert_eq!(rates.update(14_000, &later).of(&later).unwrap().read, 0.0);
    }

    #[test]
    fn durations_and_boots_read_for_people() {
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(723), "12m03s");
        assert_eq!(duration(3 * 3600 + 4 * 60 + 5), "3h04m");
        assert_eq!(duration(2 * 86_400 + 3 * 3600), "2d03h");
        assert_eq!(duration(-3), "0s");
        assert_eq!(
            Boot::Booted { seconds: 23.14 }.describe(),
            "booted in 23.1s"
        );
        assert_eq!(Boot::Booted { seconds: 95.0 }.describe(), "booted in 1m35s");
        assert_eq!(Boot::Booting { seconds: 12.7 }.describe(), "booting 12s");
        assert_eq!(rate(Some(1536.0)), "1.5KiB/s");
        assert_eq!(rate(None), "-");
        let started = SessionBoot {
            session: "s1".into(),
            first_attached_at: Some(1_000),
            boot_seconds: None,
        };
        assert_eq!(
            Boot::of(Some(&started), true, 13_000),
            Boot::Booting { seconds: 12.0 }
        );
        assert_eq!(Boot::of(Some(&started), false, 13_000), Boot::Unknown);
        let done = SessionBoot {
            boot_seconds: Some(23.1),
            ..started
        };
        assert_eq!(
            Boot::of(Some(&done), true, 99_000),
            Boot::Booted { seconds: 23.1 }
        );
    }
}
