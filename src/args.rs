//! The admin commands' arguments (clap): `vdisk`, `client`, `session`, `policy`.

use clap::{Args, Subcommand};
use osstream_catalog::{BootMethod, VdiskMode, WriteCache};

/// An option's values, listed by `--help` and completed by the shell (the catalog parses
/// them again, so a library caller gets the same check).
fn choices(values: &'static [&'static str]) -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(values)
}

#[derive(Debug, Clone, Subcommand)]
pub enum VdiskCommand {
    /// Register an image of a backend as a vdisk.
    Add(VdiskAdd),
    /// List vdisks.
    List,
    /// Show one vdisk.
    Show { name: String },
    /// Change a vdisk.
    Set(VdiskSet),
    /// Remove a vdisk (refused while it has live sessions, unless --force).
    Rm {
        name: String,
        /// Close its live sessions and remove it anyway.
        #[arg(long)]
        force: bool,
    },
    /// Clear a private vdisk's write lock left by a session that is gone.
    ///
    /// Refused while the holding session is attached on a server whose heartbeat is
    /// fresh (its client is writing), unless --force.
    Unlock {
        name: String,
        /// Unlock even while the holder is attached on a live server: its later flushes
        /// fail (they are fenced by the lock's epoch), but a write already on its way to
        /// file, block or NFS storage may still land after the next holder's.
        #[arg(long)]
        force: bool,
    },
    /// Upload a local disk image to a backend and register it as a vdisk.
    ///
    /// Works on `file` and `s3` backends. On S3 the backend's `layout` decides how the
    /// image is stored: one object (read-only), or chunks (needed for a private vdisk,
    /// with `writable = true`). Raw images are stored as they are; qcow2, VMDK, VHD(X)
    /// and VDI images are first converted to raw with `qemu-img convert` (qemu-utils),
    /// which needs free space in data_dir for the whole raw image. The stored image is
    /// read back and its SHA-256 compared with the file's before the vdisk is registered.
    Import(VdiskImport),
    /// Download a vdisk's base image (without any client's overlay) to a raw, sparse file.
    ///
    /// Safe while the server runs; for a private vdisk in use, it shows what its client
    /// has flushed so far.
    Export(VdiskExport),
}

#[derive(Debug, Clone, Args)]
pub struct VdiskImport {
    /// The local image file (raw, or any format qemu-img reads).
    pub file: std::path::PathBuf,
    #[command(flatten)]
    pub add: VdiskAdd,
    /// Overwrite an existing image of that name on the backend (and update the vdisk if
    /// it is registered already).
    #[arg(long)]
    pub replace: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VdiskExport {
    /// The vdisk to export.
    pub name: String,
    /// The file to write (zero runs become holes).
    pub file: std::path::PathBuf,
    /// raw, or qcow2 (written raw next to FILE, then converted with qemu-img). Default:
    /// qcow2 when FILE ends in .qcow2, else raw.
    #[arg(long, value_parser = choices(&["raw", "qcow2"]))]
    pub format: Option<String>,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VdiskAdd {
    /// The vdisk's name (letters, digits, '.', '_', '-').
    pub name: String,
    /// The backend holding the image (`[backends.NAME]` in the configuration).
    #[arg(long)]
    pub backend: String,
    /// The image's name on the backend (default: the vdisk's name).
    #[arg(long)]
    pub key: Option<String>,
    /// standard: shared base, per-session overlays; private: one writer, writes to the vdisk.
    #[arg(long, default_value = "standard", value_parser = choices(VdiskMode::CHOICES))]
    pub mode: String,
    /// Where standard-mode writes go: ram, ram-overflow-disk, server-disk, server-disk-persistent,
    /// or shared-disk (a folder every server mounts, `[sessions] shared_overlay_dir`: the
    /// session survives its server).
    #[arg(long, default_value = "ram-overflow-disk", value_parser = choices(WriteCache::CHOICES))]
    pub write_cache: String,
    /// How clients boot it: linux-nbd (initramfs-tools), linux-nbd-dracut, or sanboot.
    #[arg(long, default_value = "sanboot", value_parser = choices(BootMethod::CHOICES))]
    pub boot: String,
    /// Kernel image key on the same backend (linux-nbd).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initrd image key on the same backend (linux-nbd).
    #[arg(long)]
    pub initrd: Option<String>,
    /// Kernel command line (linux-nbd).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Free text for listings and boot menus.
    #[arg(long, default_value = "")]
    pub description: String,
}

#[derive(Debug, Clone, Args)]
pub struct VdiskSet {
    /// The vdisk to change.
    pub name: String,
    /// standard: shared base, per-session overlays; private: one writer, writes to the vdisk.
    #[arg(long, value_parser = choices(VdiskMode::CHOICES))]
    pub mode: Option<String>,
    /// Where standard-mode writes go (sessions opened from now on).
    #[arg(long, value_parser = choices(WriteCache::CHOICES))]
    pub write_cache: Option<String>,
    /// How clients boot it: linux-nbd (initramfs-tools), linux-nbd-dracut, or sanboot.
    #[arg(long, value_parser = choices(BootMethod::CHOICES))]
    pub boot: Option<String>,
    /// Kernel key; an empty string clears it.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initrd key; an empty string clears it.
    #[arg(long)]
    pub initrd: Option<String>,
    /// Kernel command line; an empty string clears it.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Free text for listings and boot menus.
    #[arg(long)]
    pub description: Option<String>,
    /// Offer it to clients again.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Stop offering it to clients (live sessions continue).
    #[arg(long)]
    pub disable: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Register a client by MAC (aa:bb:cc:dd:ee:ff, aa-bb-.. or aabbcc..).
    Add(ClientFields),
    /// List clients.
    List {
        /// Only the clients of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Show one client with its vdisks.
    Show { mac: String },
    /// Change a client (an empty value clears a field).
    Set(ClientFields),
    /// Remove a client (its sessions are closed).
    Rm { mac: String },
    /// Let a client boot a vdisk.
    Assign {
        mac: String,
        vdisk: String,
        /// Make it the client's default vdisk.
        #[arg(long)]
        default: bool,
    },
    /// Take a vdisk away from a client.
    Unassign { mac: String, vdisk: String },
    /// Create or update clients from a CSV or TOML file; running it again changes nothing.
    ///
    /// CSV: a header row naming the columns, `mac` and any of `name`, `hostname`, `group`,
    /// `vdisks` (`;`-separated), then one client per row. TOML: one `[[client]]` table per
    /// client, with `mac` and any of `name`, `hostname`, `group` (strings), `vdisks` (an
    /// array). A client that exists is updated to match: an empty value clears a field, a
    /// column or key left out leaves it as it is. The listed vdisks are assigned (after
    /// the client's others, in order); its other vdisks are kept unless --exact. The whole
    /// file is checked first and every problem reported with its line: a file with any
    /// problem changes nothing. The rest is written in one transaction.
    Import(ClientImport),
}

#[derive(Debug, Clone, Args)]
pub struct ClientImport {
    /// The file: .csv or .toml (`-` reads stdin, with --format).
    pub file: std::path::PathBuf,
    /// csv or toml (default: from FILE's extension).
    #[arg(long, value_parser = choices(&["csv", "toml"]))]
    pub format: Option<String>,
    /// Also take away the vdisks a client has but its entry does not list (an entry
    /// without a vdisks column or key keeps its vdisks).
    #[arg(long)]
    pub exact: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ClientFields {
    pub mac: String,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long)]
    pub group: Option<String>,
    /// The IPv4 address full-mode DHCP always gives it (a reservation; empty clears).
    #[arg(long)]
    pub ip: Option<String>,
    #[arg(long)]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SessionCommand {
    /// List live sessions (--all: closed ones too; --watch: again every 2 s).
    List {
        #[arg(long)]
        all: bool,
        /// Print the list again every --interval until Ctrl-C (on a terminal, in place).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        refresh: Refresh,
    },
    /// Open a session of a client on one of its vdisks; prints the client's nbd:// URI.
    Open { mac: String, vdisk: String },
    /// Close a session by id.
    Close { id: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ServerCommand {
    /// List the servers sharing the catalog: state (alive, draining, stopped, gone),
    /// addresses, capacity, preferred subnets, live sessions, traffic and load.
    List,
    /// Send no new sessions to a server (by name or id); it keeps serving those it has.
    /// Its sessions end or move as clients reboot, then it can be stopped.
    Drain {
        /// The server's name (`[cluster] name`) or its id (both in `server list`).
        server: String,
    },
    /// Let a drained server take new sessions again.
    Undrain {
        /// The server's name (`[cluster] name`) or its id (both in `server list`).
        server: String,
    },
    /// Forget a retired server (by name or id): it leaves `server list` and the list
    /// agents fail over to. Refused while it runs or has open sessions; a removed server
    /// that starts again registers anew.
    Rm {
        /// The server's name (`[cluster] name`) or its id (both in `server list`).
        server: String,
    },
}

/// How a live view refreshes (`osstream top`, `session list --watch`).
#[derive(Debug, Clone, Args)]
pub struct Refresh {
    /// Time between refreshes: seconds (`5`) or with a unit (`500ms`, `1m`); default 2 s,
    /// how often the server rewrites the statistics these views read.
    #[arg(long, value_name = "SECONDS", value_parser = interval)]
    pub interval: Option<osstream_core::Seconds>,
    /// Print one refresh and exit (for scripts; --json: one document).
    #[arg(long)]
    pub once: bool,
}

/// The shortest refresh interval: faster than the server rewrites its statistics (every
/// 2 s) shows nothing new, and a loop with no pause would only burn the CPU.
const SHORTEST_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn interval(text: &str) -> Result<osstream_core::Seconds, String> {
    let parsed: osstream_core::Seconds = text.parse()?;
    if parsed.0 < SHORTEST_INTERVAL {
        return Err(format!(
            "{text:?} is too short: refresh at most every {}ms",
            SHORTEST_INTERVAL.as_millis()
        ));
    }
    Ok(parsed)
}

/// `osstream top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub refresh: Refresh,
}

#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Show what happens when an unknown MAC boots.
    Show,
    /// Set it: ignore, register, or register-and-assign:TEMPLATE_MAC.
    Set { policy: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ProfileCommand {
    /// Show a vdisk's boot profile: boots merged, boot set size, whether it is current.
    Show {
        vdisk: String,
        /// Also list the boot set's blocks, in the order they are streamed.
        #[arg(long)]
        blocks: bool,
    },
    /// Forget a vdisk's boot profile (the next boot records a new one).
    Clear { vdisk: String },
    /// Write a vdisk's boot profile as JSON, to stdout or a file.
    Export {
        vdisk: String,
        /// Write here instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
    /// Store a profile written by `profile export` as VDISK's (`-` reads stdin).
    Import {
        vdisk: String,
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum CacheCommand {
    /// Hits, misses, evictions and backend reads per cache tier, and what prefetching did,
    /// since the server on this data_dir started (it writes them every 2 s and at stop).
    Stats,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Replay boot traces against the RAM tier's eviction policies: hit ratio, backend
    /// reads and bytes per policy and capacity (traces: benches/traces/, or written by a
    /// server with `[profile] trace_dir`).
    Cache(BenchCache),
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchCache {
    /// A trace file; `FILE=N` replays N copies, each started `--stagger` after the last
    /// (N clients booting one image). Repeat for several clients of one image.
    #[arg(long, required = true, value_name = "FILE[=N]")]
    pub trace: Vec<String>,
    /// Policies to compare, comma-separated.
    #[arg(long, default_value = "clock,lru,s3fifo")]
    pub policy: String,
    /// Cache capacities to try; repeat for several.
    #[arg(long, default_values = ["64MiB", "256MiB", "1GiB"])]
    pub capacity: Vec<osstream_core::ByteSize>,
    /// Cache block size.
    #[arg(long, default_value = "64KiB")]
    pub block_size: osstream_core::ByteSize,
    /// Time between the starts of the copies of a `FILE=N` trace.
    #[arg(long, default_value = "2s")]
    pub stagger: osstream_core::Seconds,
}
