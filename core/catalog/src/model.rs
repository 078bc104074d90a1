//! The records of the catalog.

use std::fmt;
use std::str::FromStr;

use osstream_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// A MAC address, stored normalised as `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(String);

impl Mac {
    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Mac {
    type Err = Error;

    /// Accepts `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` and `aabbccddeeff`, any case.
    fn from_str(text: &str) -> Result<Self> {
        osstream_core::normalize_mac(text)
            .map(Mac)
            .ok_or_else(|| bad_mac(text))
    }
}

fn bad_mac(text: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "invalid MAC address {text:?}: use aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff or aabbccddeeff"
        ),
    )
}

impl TryFrom<String> for Mac {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<Mac> for String {
    fn from(mac: Mac) -> String {
        mac.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Declares a text enum stored by name, with parse errors that list the choices.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every choice, as written in commands and the database.
            pub const CHOICES: &'static [&'static str] = &[$($text),+];

            /// The name as written in commands and the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(text: &str) -> Result<Self> {
                match text {
                    $($text => Ok($name::$variant),)+
                    other => Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("invalid {} {other:?}; choose one of: {}", $what, Self::CHOICES.join(", ")),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Who may write a vdisk.
    VdiskMode, "mode" {
        /// Shared base image; every session writes to its own overlay.
        Standard = "standard",
        /// One writer at a time, writing to the vdisk itself.
        Private = "private",
    }
);

text_enum!(
    /// Where a standard-mode session's writes go.
    WriteCache, "write cache" {
        /// Server RAM, bounded; when full, writes fail with ENOSPC.
        Ram = "ram",
        /// Server RAM first, least recently used blocks spill to server disk.
        RamOverflowDisk = "ram-overflow-disk",
        /// A file on the server's disk, discarded when the client's next session starts.
        ServerDisk = "server-disk",
        /// A file on the server's disk, kept across the client's reboots.
        ServerDiskPersistent = "server-disk-persistent",
        /// A file in the folder every server shares (`[sessions] shared_overlay_dir`, on
        /// NFS): discarded like `server-disk`, and the session moves to another server
        /// with its writes when its server dies.
        SharedDisk = "shared-disk",
    }
);

text_enum!(
    /// How a client boots the vdisk.
    BootMethod, "boot method" {
        /// Kernel and initrd over the network, root streamed over NBD, the command line in
        /// the form of Debian's initramfs-tools (`nbdroot=SERVER:PORT/EXPORT`).
        LinuxNbd = "linux-nbd",
        /// As `linux-nbd`, the command line in the form of dracut's `nbd` module
        /// (`root=nbd:SERVER:EXPORT`, NBD on port 10809).
        LinuxNbdDracut = "linux-nbd-dracut",
        /// The firmware boots the disk itself (iPXE `sanboot`).
        Sanboot = "sanboot",
    }
);

/// A virtual disk: an image on a backend, and how clients use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vdisk {
    /// Unique name.
    pub name: String,
    /// The backend (`[backends.NAME]`) holding the image.
    pub backend: String,
    /// The image's name inside the backend.
    pub key: String,
    /// Size in bytes when it was added.
    pub size: u64,
    /// Who may write.
    pub mode: VdiskMode,
    /// Where standard-mode writes go.
    pub write_cache: WriteCache,
    /// How it boots.
    pub boot: BootMethod,
    /// Kernel image (key on the backend), for `linux-nbd`.
    pub kernel: Option<String>,
    /// Initrd image (key on the backend), for `linux-nbd`.
    pub initrd: Option<String>,
    /// Kernel command line, for `linux-nbd`.
    pub cmdline: Option<String>,
    /// Free text for listings and boot menus.
    pub description: String,
    /// Disabled vdisks are not offered to clients.
    pub enabled: bool,
    /// The session holding a private vdisk's write lock, if any.
    pub locked_by: Option<String>,
    /// When it was added (Unix milliseconds).
    pub created_at: i64,
    /// Where its bytes live ([`osstream_core::ImageBackend::identity`]), as last seen by a
    /// server or an admin command with its backend configured; `None` until then.
    #[serde(default)]
    pub image_id: Option<String>,
}

/// A machine that boots from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// Its MAC address: the identity the network gives us.
    pub mac: Mac,
    /// A unique short name.
    pub name: Option<String>,
    /// A unique hostname it is given.
    pub hostname: Option<String>,
    /// A group, for bulk assignments and policies.
    pub group: Option<String>,
    /// The IPv4 address DHCP always gives it (a reservation), if any.
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Free text.
    pub notes: String,
    /// When it first booted (Unix milliseconds).
    pub first_seen: Option<i64>,
    /// When it last booted (Unix milliseconds).
    pub last_seen: Option<i64>,
    /// When it was added (Unix milliseconds).
    pub created_at: i64,
}

/// A vdisk a client may boot, in menu order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The client.
    pub mac: Mac,
    /// The vdisk.
    pub vdisk: String,
    /// Menu position (0 first).
    pub position: i64,
    /// Booted when the client does not choose.
    pub is_default: bool,
}

/// A client's attachment to a vdisk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Short id for admins.
    pub id: String,
    /// Unguessable token; the export name is `s/<token>`.
    pub token: String,
    /// The client.
    pub mac: Mac,
    /// The vdisk.
    pub vdisk: String,
    /// The last peer address seen.
    pub peer: Option<String>,
    /// When it was opened (Unix milliseconds).
    pub started_at: i64,
    /// When it last carried I/O (Unix milliseconds).
    pub last_active: i64,
    /// Bytes read through it.
    pub bytes_read: u64,
    /// Bytes written through it.
    pub bytes_written: u64,
    /// When it was closed; `None` while live.
    pub closed_at: Option<i64>,
    /// Why it ended, in words for the admin and the client's refusal; `None` while live.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// The server holding it (its id in `servers`): connections are served there only.
    #[serde(default)]
    pub owner: Option<String>,
    /// The server placement sent its client to (its id in `servers`), before any server
    /// holds it; `None` when no server placed it.
    #[serde(default)]
    pub placed_on: Option<String>,
    /// The holding server has connections of it now.
    #[serde(default)]
    pub attached: bool,
    /// When its last connection closed (database clock); it ends `grace` later unless a
    /// connection comes back.
    #[serde(default)]
    pub detached_at: Option<i64>,
    /// The lock epoch its writes are fenced with (private vdisks).
    #[serde(default)]
    pub epoch: u64,
    /// The image it reads: its vdisk's image when it started, kept when the vdisk's image
    /// is replaced (`None` for sessions older than catalog version 5: the vdisk's image).
    #[serde(default)]
    pub image_key: Option<String>,
}

/// A server sharing the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    /// Kept in the server's data directory across restarts.
    pub id: String,
    /// New at every start of the server process.
    pub instance: String,
    /// Its host name, for people.
    pub name: String,
    /// The `HOST:PORT` its clients use for NBD, if known.
    pub nbd_address: Option<String>,
    /// When this instance started (Unix milliseconds).
    pub started_at: i64,
    /// Its last heartbeat (database clock, Unix milliseconds).
    pub heartbeat_at: i64,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<i64>,
    /// Milliseconds since its last heartbeat, by the database's clock.
    pub heartbeat_age: i64,
    /// The base URL of its HTTP listener (`http://HOST:PORT`), if it has one clients reach.
    pub http_url: Option<String>,
    /// Its share of new sessions relative to the other servers (1.0 by default).
    pub capacity: f64,
    /// Client subnets (CIDRs) that prefer it.
    pub subnets: Vec<String>,
    /// Being drained: it keeps its sessions and gets no new ones.
    pub draining: bool,
    /// Bytes per second its clients moved, as of its last heartbeat.
    pub bytes_per_sec: u64,
    /// Live sessions it holds, or that were placed on it and no server holds yet.
    pub sessions: u64,
    /// It has the shared overlay folder: it may serve `shared-disk` vdisks.
    pub shared_overlays: bool,
    /// Its `[sessions] server_timeout` in milliseconds (0: not recorded).
    pub server_timeout_ms: i64,
}

impl Server {
    /// Whether it is serving now: not stopped, heartbeat younger than `timeout_ms`.
    pub fn alive(&self, timeout_ms: i64) -> bool {
        self.stopped_at.is_none() && self.heartbeat_age < timeout_ms
    }

    /// Its state in a word, for tables: `alive`, `draining`, `stopped` or `gone`.
    pub fn state(&self, timeout_ms: i64) -> &'static str {
        match (self.alive(timeout_ms), self.stopped_at.is_some()) {
            (true, _) if self.draining => "draining",
            (true, _) => "alive",
            (false, true) => "stopped",
            (false, false) => "gone",
        }
    }
}

impl Session {
    /// The NBD export name that reaches this session.
    pub fn export_name(&self) -> String {
        format!("s/{}", self.token)
    }
}

/// What the server does when an unknown MAC boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum UnknownClientPolicy {
    /// Nothing: unknown clients get no vdisk.
    Ignore,
    /// Add it to the catalog, with no vdisks.
    Register,
    /// Add it and give it the vdisks of the template client.
    RegisterAndAssign {
        /// MAC of the client whose assignments are copied.
        template: Mac,
    },
}

impl fmt::Display for UnknownClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownClientPolicy::Ignore => f.write_str("ignore"),
            UnknownClientPolicy::Register => f.write_str("register"),
            UnknownClientPolicy::RegisterAndAssign { template } => {
                write!(f, "register-and-assign:{template}")
            }
        }
    }
}

impl FromStr for UnknownClientPolicy {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.split_once(':') {
            None if text == "ignore" => Ok(UnknownClientPolicy::Ignore),
            None if text == "register" => Ok(UnknownClientPolicy::Register),
            Some(("register-and-assign", mac)) => Ok(UnknownClientPolicy::RegisterAndAssign {
                template: mac.parse()?,
            }),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "invalid unknown-client policy {text:?}; choose ignore, register or register-and-assign:TEMPLATE_MAC"
                ),
            )),
        }
    }
}

/// Checks a vdisk, client or group name: 1-64 of `[A-Za-z0-9._-]`, not starting with `.`
/// or `-`.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "invalid {what} {name:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise() {
        for text in [
            "AA:bb:CC:dd:EE:ff",
            "aa-bb-cc-dd-ee-ff",
            "aabbccddeeff",
            " AABBCCDDEEFF ",
        ] {
            assert_eq!(text.parse::<Mac>().unwrap().as_str(), "aa:bb:cc:dd:ee:ff");
        }
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:gg",
            "aa:bb-cc:dd:ee:ff",
            "aabbccddeeff00",
            "a:bb:cc:dd:ee:fff",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert!(
                err.to_string().contains("invalid MAC address"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn enums_list_their_choices() {
        assert_eq!(
            "server-disk".parse::<WriteCache>().unwrap(),
            WriteCache::ServerDisk
        );
        let err = "disk".parse::<WriteCache>().unwrap_err();
        assert!(
            err.to_string()
                .contains("ram, ram-overflow-disk, server-disk, server-disk-persistent"),
            "{err}"
        );
        assert!("shared".parse::<VdiskMode>().is_err());
    }

    #[test]
    fn policies_parse() {
        assert_eq!(
            "ignore".parse::<UnknownClientPolicy>().unwrap(),
            UnknownClientPolicy::Ignore
        );
        let p: UnknownClientPolicy = "register-and-assign:aabbccddeeff".parse().unwrap();
        assert_eq!(p.to_string(), "register-and-assign:aa:bb:cc:dd:ee:ff");
        assert!("assign".parse::<UnknownClientPolicy>().is_err());
    }
}
