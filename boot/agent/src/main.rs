//! `osstream-agent`: the client side of osstream (see the library documentation).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use osstream_agent::agent::{info_base, root_and_info};
use osstream_agent::{
    Agent, AgentConfig, AgentStats, CacheSettings, OverlayPlace, RemoteConfig, RemoteTls,
    ServerBook,
};
use osstream_cache_disk::DiskTier;
use osstream_core::{ByteSize, Error, ErrorKind, Result, ServerEntry};
use tokio_util::sync::CancellationToken;

/// The osstream client agent: serves a session's disk to this machine's kernel over NBD
/// on a Unix socket, caching the base image on a local disk and keeping the machine's
/// writes local.
///
/// In an initramfs: `osstream-agent run --cmdline --cache-dir /cache &` then
/// `nbd-client -unix /run/osstream-agent.sock /dev/nbd0`. `--cmdline` reads
/// `nbdroot=HOST:PORT/EXPORT` and `osstream.agent=URL` from the kernel command line the
/// osstream server's boot script set.
#[derive(Debug, Parser)]
#[command(name = "osstream-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the disk until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Print the counters of a running (or the last) agent.
    Stats {
        /// The cache folder the agent was given (reads its agent-stats.json).
        #[arg(long, conflicts_with = "stats")]
        cache_dir: Option<PathBuf>,
        /// The stats file the agent was given.
        #[arg(long)]
        stats: Option<PathBuf>,
        /// Print the counters as one line of JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tell the server this machine's boot is complete: the recording of its boot (the
    /// vdisk's boot profile) ends now rather than after a quiet period. Run it when the
    /// system is up (a systemd unit after multi-user.target).
    #[command(group(clap::ArgGroup::new("session").required(true)))]
    Booted {
        /// Read the info URL from the kernel command line (`osstream.agent=`).
        #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "/proc/cmdline",
              group = "session")]
        cmdline: Option<PathBuf>,
        /// The session's info URL (`http://HOST:PORT/agent/TOKEN`).
        #[arg(long, value_name = "URL", group = "session")]
        info: Option<String>,
    },
    /// Empty the client cache (the agent must not be running on it).
    Clear {
        /// The cache folder.
        #[arg(long)]
        cache_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Read the server, export and info URL from the kernel command line
    /// (`/proc/cmdline`, or FILE): `nbdroot=HOST:PORT/EXPORT osstream.agent=URL`, and
    /// `osstream.tls_ca=PATH` (as --tls-ca, a file in the initramfs) if present.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "/proc/cmdline")]
    cmdline: Option<PathBuf>,
    /// The server's NBD address (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "cmdline")]
    nbd: Option<String>,
    /// The export to open: the session's `s/TOKEN`.
    #[arg(long, required_unless_present = "cmdline")]
    export: Option<String>,
    /// Another server sharing the catalog (HOST:PORT of its NBD listener) to fail over to
    /// when the server in use cannot be reached; repeat for more. With --info the agent
    /// also learns them from the server (GET /servers), and again every minute.
    #[arg(long, value_name = "HOST:PORT")]
    also_server: Vec<String>,
    /// The session's description on the server's HTTP listener
    /// (`http://HOST:PORT/agent/TOKEN`). Without it nothing is cached locally and writes
    /// go to the server.
    #[arg(long, value_name = "URL")]
    info: Option<String>,
    /// The Unix socket to serve the disk on.
    #[arg(long, default_value = "/run/osstream-agent.sock")]
    socket: PathBuf,
    /// The export name on that socket (also served for the empty name).
    #[arg(long, default_value = "disk")]
    export_name: String,
    /// A folder on a local disk for the block cache (and the write overlay's overflow).
    /// Without it nothing is cached on the client.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The cache's size.
    #[arg(long, default_value = "4GiB")]
    cache_size: ByteSize,
    /// The cache's block size.
    #[arg(long, default_value = "64KiB")]
    cache_block_size: ByteSize,
    /// Reclaim starts when this percentage of the cache is in use...
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(2..=100))]
    high_watermark: u8,
    /// ...and evicts the least recently used blocks down to this percentage.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(1..=99))]
    low_watermark: u8,
    /// Where this machine's writes stay.
    #[arg(long, value_enum, default_value = "ram")]
    overlay: OverlayPlace,
    /// RAM for the write overlay (with --overlay ram: beyond it, writes overflow to the
    /// cache folder, or fail with ENOSPC without one).
    #[arg(long, default_value = "256MiB")]
    overlay_ram: ByteSize,
    /// Once the boot is over (30 s without a read), read the rest of the image into the
    /// cache in the background, below the kernel's reads (so a later outage of the
    /// server does not hurt).
    #[arg(long)]
    fill: bool,
    /// Boot-set reads in flight at once.
    #[arg(long, default_value_t = 4)]
    prefetch_depth: usize,
    /// A request without an answer for this many seconds is taken as a broken
    /// connection and sent again on a new one.
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
    /// Fail the kernel's requests after this many seconds without the server (0: wait
    /// for ever, what a machine whose root is on the server needs).
    #[arg(long, default_value_t = 0)]
    give_up_after: u64,
    /// Where to write the counters (default: the cache folder's agent-stats.json).
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Run as `@osstream-agent` (argv[0] starting with `@`), which systemd spares when it
    /// kills processes at shutdown: the root file system is served by this process until
    /// the very end (nbd-client's `-systemd-mark`).
    #[arg(long)]
    systemd_mark: bool,
    /// Speak TLS to the server (NBD STARTTLS), trusting the CA in this PEM file: the
    /// session token and the disk's bytes then never cross the network in clear. Needed
    /// when the server has `[nbd] tls = "require"`.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This machine's certificate (PEM), for a server that checks clients'
    /// (`[nbd] tls_client_ca`); with --tls-key.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name every server's certificate must carry (default: the host of the address
    /// of the server connected to).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Log debug lines too.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run(*args),
        Command::Stats {
            cache_dir,
            stats,
            json,
        } => show_stats(cache_dir, stats, json),
        Command::Booted { cmdline, info } => booted(cmdline, info),
        Command::Clear { cache_dir } if !cache_dir.is_dir() => Err(Error::new(
            ErrorKind::NotFound,
            format!("there is no cache folder {}", cache_dir.display()),
        )),
        Command::Clear { cache_dir } => DiskTier::clear(&cache_dir.join("blocks")).map(|freed| {
            println!(
                "cleared the client cache in {} ({} freed)",
                cache_dir.display(),
                ByteSize(freed)
            );
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("osstream-agent: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `HOST:PORT` with a port number (a host name is looked up when connecting).
fn check_server_address(address: &str) -> Result<()> {
    let port = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|port| *port != 0);
    if port.is_none() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "the server's NBD address {:?} is not HOST:PORT (--nbd, or nbdroot=HOST:PORT/s/TOKEN)",
                osstream_core::redact_tokens(address)
            ),
        ));
    }
    Ok(())
}

fn config_of(mut args: RunArgs) -> Result<(AgentConfig, bool)> {
    let (mut nbd, mut export, mut info) = (args.nbd.take(), args.export.take(), args.info.take());
    if let Some(path) = &args.cmdline {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::from_io(e, format!("cannot read {}", path.display())))?;
        let (root, url) = root_and_info(&text);
        let Some((address, name)) = root else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{} has no nbdroot=HOST:PORT/EXPORT", path.display()),
            ));
        };
        nbd.get_or_insert(address);
        export.get_or_insert(name);
        if args.tls_ca.is_none() {
            args.tls_ca = text
                .split_whitespace()
                .find_map(|word| word.strip_prefix("osstream.tls_ca="))
                .map(PathBuf::from);
        }
        if info.is_none() {
            info = url;
        }
    }
    let (Some(nbd), Some(export)) = (nbd, export) else {
        return Err(Error::new(
            ErrorKind::Config,
            "give --nbd and --export, or --cmdline",
        ));
    };
    // The description must be the export's: its image and generation key the cache.
    if let (Some(token), Some(url)) = (export.strip_prefix("s/"), &info)
        && url
            .rsplit_once("/agent/")
            .is_some_and(|(_, t)| t.trim_end_matches('/') != token)
    {
        return Err(Error::new(
            ErrorKind::Config,
            "--info names another session than --export (their tokens differ)",
        ));
    }
    // What cannot parse now never will: refuse it here instead of retrying for ever.
    check_server_address(&nbd)?;
    for also in &args.also_server {
        check_server_address(also)?;
    }
    if let Some(url) = &info {
        osstream_agent::fetch::split_url(url)
            .map_err(|e| Error::new(ErrorKind::Config, format!("--info: {}", e.message())))?;
    }
    let block = args.cache_block_size.bytes();
    if args.cache_dir.is_some() && args.cache_size.bytes() < 16 * block {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "--cache-size must hold at least 16 blocks of --cache-block-size ({}); give at least {} (default 4GiB)",
                args.cache_block_size,
                osstream_core::ByteSize(16 * block)
            ),
        ));
    }
    if args.low_watermark >= args.high_watermark {
        return Err(Error::new(
            ErrorKind::Config,
            "--low-watermark must be below --high-watermark",
        ));
    }
    if !block.is_power_of_two() || !(4096..=(16 << 20)).contains(&block) {
        return Err(Error::new(
            ErrorKind::Config,
            "--cache-block-size must be a power of two from 4KiB to 16MiB",
        ));
    }
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            let credentials = osstream_nbd::tls::client_connector(ca, identity)?;
            let server_name = args
                .tls_server_name
                .as_deref()
                .map(osstream_nbd::tls::server_name)
                .transpose()?;
            // Checked now, so a bad address fails at start, not at each connection.
            osstream_nbd::tls::server_name(osstream_nbd::tls::host_of(&nbd))?;
            Some(RemoteTls {
                credentials,
                server_name,
            })
        }
    };
    let cache = args.cache_dir.map(|dir| CacheSettings {
        dir,
        capacity: args.cache_size.bytes(),
        block_size: block,
        watermarks: (args.high_watermark, args.low_watermark),
    });
    let config = AgentConfig {
        remote: RemoteConfig {
            servers: {
                let http = info.as_deref().and_then(|url| info_base(url).ok());
                let book = ServerBook::new(nbd, http);
                let also: Vec<ServerEntry> = args
                    .also_server
                    .iter()
                    .map(|nbd| ServerEntry {
                        name: nbd.clone(),
                        nbd: nbd.clone(),
                        http: None,
                    })
                    .collect();
                book.learn(&also);
                book
            },
            export,
            request_timeout: Duration::from_secs(args.request_timeout.max(1)),
            give_up_after: (args.give_up_after > 0)
                .then(|| Duration::from_secs(args.give_up_after)),
            read_only: false,
            tls,
        },
        info_url: info,
        socket: args.socket,
        export_name: args.export_name,
        cache,
        overlay: args.overlay,
        overlay_ram: args.overlay_ram.bytes(),
        fill: args.fill,
        prefetch_depth: args.prefetch_depth,
        stats_file: args.stats,
    };
    Ok((config, args.verbose))
}

/// Runs this program again as `@osstream-agent` with the same arguments (see
/// `--systemd-mark`); returns only if that fails.
fn exec_marked() -> Error {
    use std::os::unix::process::CommandExt;
    let err = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .arg0("@osstream-agent")
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(err) => err,
    };
    Error::from_io(err, "cannot run again as @osstream-agent (--systemd-mark)")
}

fn run(args: RunArgs) -> Result<()> {
    let marked = std::env::args_os()
        .next()
        .is_some_and(|a| a.to_string_lossy().starts_with('@'));
    if args.systemd_mark && !marked {
        return Err(exec_marked());
    }
    let (config, verbose) = config_of(args)?;
    tracing_subscriber::fmt()
        .with_max_level(if verbose {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        })
        .with_writer(|| osstream_core::LossyStderr)
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::from_io(e, "cannot start the runtime"))?;
    runtime.block_on(async move {
        let agent = Agent::start(config).await?;
        tracing::info!(listen = ?agent.bound(), "agent: serving the disk");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("agent: stopping");
            stop.cancel();
        });
        agent.run(shutdown).await
    })
}

fn booted(cmdline: Option<PathBuf>, info: Option<String>) -> Result<()> {
    let url = match (info, cmdline) {
        (Some(url), _) => url,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::from_io(e, format!("cannot read {}", path.display())))?;
            root_and_info(&text).1.ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("{} has no osstream.agent=URL", path.display()),
                )
            })?
        }
        (None, None) => {
            return Err(Error::new(
                ErrorKind::Config,
                "give --cmdline [FILE] (the kernel command line) or --info URL",
            ));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::from_io(e, "cannot start the runtime"))?;
    let answer = match runtime.block_on(osstream_agent::fetch::get(
        &format!("{}/booted", url.trim_end_matches('/')),
        Duration::from_secs(10),
    )) {
        Err(err) if err.kind() == ErrorKind::NotFound && err.message().contains("has ended") => {
            // The session the boot began with is gone (a server restart; the agent may
            // serve on under a new one): its recording went with it.
            println!(
                "the boot's session has ended, so nothing of it is being recorded ({})",
                err.message()
            );
            return Ok(());
        }
        answer => answer?,
    };
    println!("the server: {}", answer.trim());
    Ok(())
}

fn show_stats(cache_dir: Option<PathBuf>, stats: Option<PathBuf>, json: bool) -> Result<()> {
    let path = match (stats, cache_dir) {
        (Some(path), _) => path,
        (None, Some(dir)) => dir.join("agent-stats.json"),
        (None, None) => {
            return Err(Error::new(ErrorKind::Config, "give --cache-dir or --stats"));
        }
    };
    // The agent rewrites the file in place: a read that catches it half written tries again.
    let mut attempt = 0;
    let stats: AgentStats = loop {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::from_io(
                e,
                format!(
                    "cannot read {} (has an agent run with this folder?)",
                    path.display()
                ),
            )
        })?;
        match serde_json::from_str(&text) {
            Ok(stats) => break stats,
            Err(_) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{} is not an agent stats file: {e}", path.display()),
                ));
            }
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&stats).expect("stats serialise")
        );
    } else {
        print!("{}", stats.render());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_gives_the_root_and_the_info_url() {
        let (root, info) = root_and_info(
            "console=ttyS0 root=/dev/nbd0 nbdroot=10.0.0.1:10809/s/tok ip=dhcp osstream.agent=http://10.0.0.1:8080/agent/tok",
        );
        assert_eq!(root, Some(("10.0.0.1:10809".into(), "s/tok".into())));
        assert_eq!(info.as_deref(), Some("http://10.0.0.1:8080/agent/tok"));
        assert_eq!(root_and_info("quiet"), (None, None));
    }
}
