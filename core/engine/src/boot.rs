//! The catalog as boot protocols see it: who a MAC is, what it may boot, what happens to
//! MACs nobody registered, and how a boot becomes a session.
//!
//! DHCP, the iPXE script builder and the unknown-client policy read the catalog through
//! [`BootDirectory`] alone, with the plain records defined here: they need neither the
//! catalog crate nor its database types, and tests can stand in a directory of their own.

use std::fmt::{self, Debug};

use async_trait::async_trait;

use crate::error::Result;
use crate::sessions::OverlayKind;

/// A MAC address in its normal spelling, `aa:bb:cc:dd:ee:ff`, from any spelling clients
/// and admins use: `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` (iPXE's `hexhyp`) or
/// `aabbccddeeff`, any case. `None` for anything else.
pub fn normalize_mac(text: &str) -> Option<String> {
    let trimmed = text.trim();
    let hex: String = match trimmed.len() {
        17 => {
            let separator = trimmed.as_bytes()[2];
            if !matches!(separator, b':' | b'-') {
                return None;
            }
            let parts: Vec<&str> = trimmed.split(separator as char).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                return None;
            }
            parts.concat()
        }
        12 => trimmed.to_owned(),
        _ => return None,
    };
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hex = hex.to_ascii_lowercase();
    let pairs: Vec<&str> = (0..6).map(|i| &hex[i * 2..i * 2 + 2]).collect();
    Some(pairs.join(":"))
}

/// A client the catalog knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootClient {
    /// Its MAC address, normalised: `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its unique short name, if it has one.
    pub name: Option<String>,
    /// The unique hostname it is given, if any.
    pub hostname: Option<String>,
    /// Its group, if any.
    pub group: Option<String>,
    /// The IPv4 address reserved for it (full-mode DHCP gives it no other), if any.
    pub ip: Option<std::net::Ipv4Addr>,
    /// When it first booted (Unix milliseconds); `None` until it does.
    pub first_seen: Option<i64>,
    /// When it last booted (Unix milliseconds); `None` until it does.
    pub last_seen: Option<i64>,
}

/// How a client boots a vdisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootKind {
    /// Kernel and initrd over the network, the root file system streamed over NBD; the
    /// kernel command line as Debian's initramfs-tools reads it.
    LinuxNbd,
    /// As [`BootKind::LinuxNbd`], the command line as dracut's `nbd` module reads it.
    LinuxNbdDracut,
    /// The firmware boots the disk itself (iPXE `sanboot`).
    Sanboot,
}

/// One entry of a client's boot menu: a vdisk assigned to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootChoice {
    /// The vdisk's name (what [`BootDirectory::open_boot_session`] takes).
    pub vdisk: String,
    /// Free text for the menu.
    pub description: String,
    /// Booted when the client does not choose.
    pub is_default: bool,
    /// How it boots.
    pub boot: BootKind,
    /// The kernel's image key on [`Self::backend`], for [`BootKind::LinuxNbd`].
    pub kernel: Option<String>,
    /// The initrd's image key on [`Self::backend`], for [`BootKind::LinuxNbd`].
    pub initrd: Option<String>,
    /// The kernel command line, for [`BootKind::LinuxNbd`].
    pub cmdline: Option<String>,
    /// The backend (`[backends.NAME]`) holding the vdisk's image, kernel and initrd.
    pub backend: String,
    /// A disabled vdisk stays on the menu so it can say why it cannot boot, but no
    /// session opens on it.
    pub enabled: bool,
}

/// What happens when a MAC the catalog does not know boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownPolicy {
    /// Nothing: the client gets no vdisk and is not registered.
    Ignore,
    /// It is registered, with no vdisks (an administrator assigns them).
    Register,
    /// It is registered and given the vdisks of the template client.
    RegisterAndAssign {
        /// The template client's MAC, normalised.
        template: String,
    },
}

/// An address a full-mode DHCP server gave a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub ip: std::net::Ipv4Addr,
    /// The client's MAC, normalised.
    pub mac: String,
    /// When it ends (Unix milliseconds); an expired lease may be given to another MAC.
    pub expires_at: i64,
}

/// Where full-mode DHCP keeps its leases, so a restarted server (or another server on the
/// same catalog) never hands an address out twice.
///
/// # Contract
/// - `bind_lease` is atomic: it gives `ip` to `mac` until `expires_at` unless another MAC
///   holds it unexpired (`Conflict`, nothing changed); a MAC holds one lease at a time
///   (its other leases end). It renews the MAC's own lease.
/// - `leases` lists the leases (expired or not) of addresses in `first..=last`, and the
///   clients' reservations there as leases that never expire.
/// - `release_lease` ends `mac`'s lease of `ip`; anything else is left alone.
#[async_trait]
pub trait LeaseStore: Send + Sync + Debug {
    /// The leases of addresses in `first..=last`.
    async fn leases(
        &self,
        first: std::net::Ipv4Addr,
        last: std::net::Ipv4Addr,
    ) -> Result<Vec<Lease>>;
    /// Gives `ip` to `mac` until `expires_at` (Unix milliseconds).
    async fn bind_lease(&self, ip: std::net::Ipv4Addr, mac: &str, expires_at: i64) -> Result<()>;
    /// Ends `mac`'s lease of `ip`.
    async fn release_lease(&self, ip: std::net::Ipv4Addr, mac: &str) -> Result<()>;
}

/// A session opened for a booting client: what it connects to.
///
/// The token is a bearer secret, so `Debug` leaves it out and shortens the export name.
#[derive(Clone, PartialEq, Eq)]
pub struct BootSession {
    /// Short id, for logs and admins.
    pub id: String,
    /// The secret that reaches the session.
    pub token: String,
    /// The export name the client opens: `s/<token>`.
    pub export: String,
    /// The client's MAC, normalised.
    pub mac: String,
    /// The vdisk.
    pub vdisk: String,
    /// `Some(kind)` for a standard vdisk (its writes go to an overlay of that kind);
    /// `None` for a private vdisk, written in place.
    pub overlay: Option<OverlayKind>,
}

impl BootSession {
    /// A private vdisk's session (written in place, under the vdisk's lock).
    pub fn is_private(&self) -> bool {
        self.overlay.is_none()
    }
}

impl Debug for BootSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootSession")
            .field("id", &self.id)
            .field("export", &crate::loggable_export_name(&self.export))
            .field("mac", &self.mac)
            .field("vdisk", &self.vdisk)
            .field("overlay", &self.overlay)
            .finish_non_exhaustive()
    }
}

/// The catalog as boot protocols (DHCP, iPXE scripts, the unknown-client policy) see it.
///
/// # Contract
/// - A MAC is accepted in any spelling the catalog accepts (`aa:bb:cc:dd:ee:ff`,
///   `aa-bb-cc-dd-ee-ff`, `aabbccddeeff`, any case); a malformed one fails with
///   `InvalidInput` before anything is read or written. Records carry the normalised form.
/// - `known_client` returns `None` exactly when the catalog does not know the MAC: a
///   catalog that cannot be reached is an error (`Io`, temporary), never `None`.
/// - `boot_menu` lists the vdisks assigned to that client and nothing else, in menu order,
///   at most one of them the default; disabled vdisks are listed with `enabled` false.
///   An unknown MAC has an empty menu.
/// - `open_boot_session` opens a session only on a vdisk assigned to that client:
///   `NotFound` for an unknown client or vdisk, `PermissionDenied` for a vdisk that is
///   not assigned to it or is disabled, `Conflict` for a private vdisk another session
///   holds. It ends the client's earlier live session (one client, one session) and
///   records that the client was seen. No call ever reveals or opens another client's
///   vdisks.
/// - `unknown_policy` is read from the catalog at each call, so a change applies to the
///   next boot.
/// - `register_client` registers the MAC as the policy says, and records it as seen:
///   `PermissionDenied` naming the MAC and the policy when the policy is to ignore
///   unknown clients, `Conflict` when the catalog knows the MAC already (another server
///   may have registered it a moment earlier), `NotFound` when the policy's template
///   client no longer exists. A registration that fails part-way (a template's vdisk
///   removed meanwhile) is undone, so a retry starts afresh.
/// - `session_boot` answers for a live session only (an ended or replaced one is
///   `NotFound`, as an unknown token), and only with the vdisk that session opened.
/// - `client_seen` records that the client is booting now; an unknown MAC is not an error
///   and changes nothing.
/// - Every method is safe to call concurrently, from several servers sharing a catalog.
#[async_trait]
pub trait BootDirectory: Send + Sync + Debug {
    /// The client with this MAC, or `None` if the catalog does not know it.
    async fn known_client(&self, mac: &str) -> Result<Option<BootClient>>;
    /// The vdisks this client may boot, in menu order.
    async fn boot_menu(&self, mac: &str) -> Result<Vec<BootChoice>>;
    /// What happens when a MAC the catalog does not know boots.
    async fn unknown_policy(&self) -> Result<UnknownPolicy>;
    /// Registers a MAC the catalog does not know, as the unknown-client policy allows;
    /// `notes` (may be empty) says for the administrator where it was first seen.
    async fn register_client(&self, mac: &str, notes: &str) -> Result<BootClient>;
    /// Opens a session of the client on one of its vdisks; `peer` is the address it boots
    /// from, if known.
    async fn open_boot_session(
        &self,
        mac: &str,
        vdisk: &str,
        peer: Option<&str>,
    ) -> Result<BootSession>;
    /// Records that the client is booting now (its first and last seen).
    async fn client_seen(&self, mac: &str) -> Result<()>;
    /// The vdisk a live session boots, as its client's menu lists it: what the session's
    /// boot files (kernel, initrd) are. `NotFound` for a token no live session has.
    async fn session_boot(&self, token: &str) -> Result<(BootSession, BootChoice)>;
}

/// A server a new session was placed on, as a boot script needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedServer {
    /// Its id in the catalog.
    pub id: String,
    /// Its name, for logs.
    pub name: String,
    /// Whether it is the server answering (its own addresses apply).
    pub here: bool,
    /// Where its clients reach NBD (`HOST:PORT`).
    pub nbd_address: Option<String>,
    /// The base URL of its HTTP listener (`http://HOST:PORT`), if clients reach it.
    pub http_url: Option<String>,
}

/// Several servers on one catalog: which one a new session goes to.
///
/// # Contract
/// - `choose` answers with a server alive now that takes new sessions (not drained),
///   weighing each one's load by its capacity and preferring the servers whose subnets
///   hold `peer`; this server (`here`) when no other qualifies or the catalog cannot be
///   read (placement never stops a boot).
/// - `servers` lists what a client may fail over to; an error only when the catalog
///   cannot be read.
/// - `record` notes that `session` went to `server`, so the next `choose` (on any
///   server) counts it in that server's load at once.
#[async_trait]
pub trait Placement: Send + Sync + Debug {
    /// The server for a new session of a client booting from `peer`; `shared_overlay`:
    /// the session's overlay is a `shared-disk` one, which only servers with the shared
    /// overlay folder serve.
    async fn choose(&self, peer: Option<std::net::IpAddr>, shared_overlay: bool) -> PlacedServer;
    /// Records that `session` (its id) was placed on `server`.
    async fn record(&self, session: &str, server: &PlacedServer) -> Result<()>;
    /// Every server alive now with an NBD address (drained ones too: they still serve),
    /// this one first: where a client agent may go when its server dies.
    async fn servers(&self) -> Result<Vec<PlacedServer>>;
}

/// Where the network saw each booting MAC: the address its DHCP lease or its PXE
/// boot-server request came from. The iPXE script of a MAC carries a session token, so
/// the HTTP server hands it only to the address seen here for that MAC (where one was
/// seen; a MAC no DHCP of this server answered is not restricted).
#[derive(Debug, Default)]
pub struct SeenAddresses {
    seen:
        std::sync::Mutex<std::collections::HashMap<String, (std::net::IpAddr, std::time::Instant)>>,
    /// This server's DHCP hands out every address on the boot LAN (full mode): a MAC it
    /// has not seen gets no script.
    authoritative: std::sync::atomic::AtomicBool,
}

/// Most MACs remembered; the oldest sightings go first.
const MOST_SIGHTINGS: usize = 65_536;

/// How long a sighting counts: a day, longer than any lease a boot LAN uses.
const SIGHTING: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl SeenAddresses {
    /// Records that `mac` (normalised) uses `ip` now.
    pub fn record(&self, mac: &str, ip: std::net::IpAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if seen.len() >= MOST_SIGHTINGS {
            seen.retain(|_, (_, when)| now.duration_since(*when) < SIGHTING);
            if seen.len() >= MOST_SIGHTINGS
                && let Some(oldest) = seen
                    .iter()
                    .min_by_key(|(_, (_, when))| *when)
                    .map(|(m, _)| m.clone())
            {
                seen.remove(&oldest);
            }
        }
        seen.insert(mac.to_owned(), (ip.to_canonical(), now));
    }

    /// Says this server's DHCP gives every address on its LAN (full mode).
    pub fn set_authoritative(&self) {
        self.authoritative
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the script of `mac` must be refused to a client at `ip`, and why: it was
    /// seen at another address, or (full DHCP mode) not seen at all.
    pub fn refuse(&self, mac: &str, ip: std::net::IpAddr) -> Option<String> {
        match self.lookup(mac) {
            Some(seen) if seen == ip.to_canonical() => None,
            Some(_) => Some(format!(
                "the boot script of {mac} is given only to the address this server's DHCP saw it use"
            )),
            None if self
                .authoritative
                .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                Some(format!(
                    "this server's DHCP has not seen {mac}: boot it from the network first"
                ))
            }
            None => None,
        }
    }

    /// The address `mac` (normalised) was last seen using, if within a day.
    pub fn lookup(&self, mac: &str) -> Option<std::net::IpAddr> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(mac)
            .filter(|(_, when)| when.elapsed() < SIGHTING)
            .map(|(ip, _)| *ip)
    }
}
