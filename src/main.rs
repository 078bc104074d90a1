//! `osstream`: the OS-streaming server and its admin commands.

mod address;
mod admin;
mod args;
mod bench;
mod client_import;
mod config;
mod demo;
mod metrics;
mod notify;
mod output;
mod placement;
mod progress;
mod serve;
mod sessions;
mod stats;
mod top;
mod transfer;
mod watch;
mod wiring;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use figment::value::{Dict, Value};

/// osstream streams operating-system disks to network-booted, diskless machines.
///
/// Configuration comes from built-in defaults, then a TOML file (--config FILE, else the
/// file OSSTREAM_CONFIG names, else ./osstream.toml, else /etc/osstream/osstream.toml,
/// the first that applies; `osstream config show` says which), then OSSTREAM_*
/// environment variables (nested keys with `__`, e.g.
/// OSSTREAM_NBD__LISTEN='["0.0.0.0:10809"]'), then command-line flags. With none of
/// them, `osstream serve` runs the embedded default: images in ./osstream-data/images, a
/// RAM cache, NBD on 127.0.0.1:10809. Admin commands use the catalog the configuration
/// names and never create one: `serve` does on its first start, or `osstream init`.
#[derive(Debug, Parser)]
#[command(name = "osstream", version, about, long_about)]
struct Cli {
    /// Read configuration from FILE (default: $OSSTREAM_CONFIG, else ./osstream.toml,
    /// else /etc/osstream/osstream.toml, if it exists).
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print JSON instead of tables, sentences or TOML (every command but serve,
    /// completions and man): a record, a list, or one object saying what was done.
    /// Errors still go to stderr, with exit status 2.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve vdisks until SIGINT or SIGTERM (in-flight requests are finished first).
    Serve(ServeArgs),
    /// Create the data folder and the catalog the configuration names (serve does it on
    /// its first start); an existing catalog is left as it is.
    Init,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage vdisks: images of a backend that clients boot.
    #[command(subcommand)]
    Vdisk(admin::VdiskCommand),
    /// Manage clients (by MAC) and what each may boot.
    #[command(subcommand)]
    Client(admin::ClientCommand),
    /// List, open and close client sessions.
    #[command(subcommand)]
    Session(admin::SessionCommand),
    /// The servers sharing the catalog: list them, drain one before stopping it.
    #[command(subcommand)]
    Server(admin::ServerCommand),
    /// What happens when an unknown MAC boots.
    #[command(subcommand)]
    Policy(admin::PolicyCommand),
    /// Boot profiles: what a vdisk's clients read first, streamed ahead of each boot.
    #[command(subcommand)]
    Profile(admin::ProfileCommand),
    /// The server's cache tiers and prefetching, as it counted them.
    #[command(subcommand)]
    Cache(admin::CacheCommand),
    /// A live table of the clients the server on this data_dir serves: per session its
    /// client, vdisk, protocol, peer, how long it is connected, bytes read and written
    /// and their rates, and boot progress; with totals and the cache hit ratio.
    ///
    /// Redraws every --interval until Ctrl-C (or q and Enter); --once prints one table.
    /// With --json: one JSON document per refresh, one per line (--once: one, indented).
    /// Reads the server's <data_dir>/stats.json (rewritten every 2 s) and the catalog.
    Top(args::TopArgs),
    /// Measure: replay boot traces against cache policies.
    #[command(subcommand)]
    Bench(args::BenchCommand),
    /// Print a shell completion script: `osstream completions bash >
    /// /etc/bash_completion.d/osstream` (zsh: a `_osstream` file on $fpath; fish:
    /// ~/.config/fish/completions/osstream.fish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (osstream.1 and one per command, osstream-vdisk-add.1...)
    /// into DIR: `osstream man /usr/local/share/man/man1`, then `man osstream`.
    Man {
        /// The folder to write them to (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// NBD listen address, HOST:PORT or unix:PATH; repeat for several (overrides `nbd.listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Log filter such as `debug` or `info,osstream_nbd=debug` (overrides `log.filter`).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment merged) as TOML,
    /// after a comment naming the file it was read from (JSON: `config_file`).
    Show,
}

fn overrides(args: &ServeArgs) -> Dict {
    let mut dict = Dict::new();
    if let Some(dir) = &args.data_dir {
        dict.insert("data_dir".into(), Value::from(dir.display().to_string()));
    }
    if !args.listen.is_empty() {
        let mut nbd = Dict::new();
        nbd.insert("listen".into(), Value::from(args.listen.clone()));
        dict.insert("nbd".into(), Value::from(nbd));
    }
    if let Some(filter) = &args.log {
        let mut log = Dict::new();
        log.insert("filter".into(), Value::from(filter.clone()));
        dict.insert("log".into(), Value::from(log));
    }
    dict
}

/// Loads the configuration and runs one admin command on a small runtime.
fn admin_command(cli: &Cli) -> osstream_core::Result<()> {
    let config = config::load(config::Sources {
        file: cli.config.as_deref(),
        overrides: Dict::new(),
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| osstream_core::Error::from_io(e, "cannot start the async runtime"))?;
    runtime.block_on(async {
        match &cli.command {
            Command::Vdisk(command) => admin::vdisk(&config, command, cli.json).await,
            Command::Client(command) => admin::client(&config, command, cli.json).await,
            Command::Session(command) => admin::session(&config, command, cli.json).await,
            Command::Policy(command) => admin::policy(&config, command, cli.json).await,
            Command::Server(command) => admin::server(&config, command, cli.json).await,
            Command::Profile(command) => admin::profile(&config, command, cli.json).await,
            Command::Cache(command) => admin::cache(&config, command, cli.json),
            Command::Top(args) => top::run(&config, args, cli.json).await,
            Command::Init => admin::init(&config, cli.json).await,
            _ => unreachable!("only admin commands come here"),
        }
    })
}

/// Restores the default action of SIGPIPE, which Rust programs ignore: an admin command
/// whose output goes to a pipe closed early (`osstream vdisk list --json | head -c 10`)
/// then ends quietly, as Unix tools do, instead of panicking on the failed write. The
/// server keeps ignoring it: a client closing its socket must never stop it.
fn quiet_on_closed_pipe() {
    // SAFETY: signal() only changes this process's disposition of SIGPIPE; it is called
    // once at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Writes a manual page per command into `dir`.
fn write_man_pages(dir: &std::path::Path) -> osstream_core::Result<()> {
    let failed = |e: std::io::Error| {
        osstream_core::Error::from_io(
            e,
            format!("cannot write manual pages into {}", dir.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(failed)?;
    fn pages(command: &clap::Command) -> usize {
        1 + command
            .get_subcommands()
            .filter(|c| !c.is_hide_set() && c.get_name() != "help")
            .map(pages)
            .sum::<usize>()
    }
    println!(
        "wrote {} manual pages into {} (osstream.1 and one per command)",
        pages(&Cli::command()),
        dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    let result = match &cli.command {
        Command::Serve(args) => {
            let (file, flags) = (cli.config.clone(), overrides(args));
            let load = move || {
                config::load(config::Sources {
                    file: file.as_deref(),
                    overrides: flags.clone(),
                })
            };
            load().and_then(|config| serve::run(config, Box::new(load)))
        }
        Command::Init => admin_command(&cli),
        Command::Vdisk(_)
        | Command::Client(_)
        | Command::Session(_)
        | Command::Server(_)
        | Command::Policy(_)
        | Command::Profile(_)
        | Command::Cache(_)
        | Command::Top(_) => admin_command(&cli),
        Command::Bench(args::BenchCommand::Cache(bench)) => {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| osstream_core::Error::from_io(e, "cannot start the async runtime"))
                .and_then(|runtime| runtime.block_on(bench::cache(bench, cli.json)))
        }
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "osstream", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => write_man_pages(dir),
        Command::Config(ConfigCommand::Show) => config::load(config::Sources {
            file: cli.config.as_deref(),
            overrides: Dict::new(),
        })
        .and_then(|mut config| {
            // Each backend table is checked by its kind, as `serve` would (unknown keys,
            // bad values), without connecting to anything. Plugins are left to `serve`:
            // checking their table means loading and running vendor code.
            for (name, table) in &config.backends {
                let is_plugin = matches!(table.get("kind"), Some(figment::value::Value::String(_, k)) if k == "plugin");
                if !is_plugin {
                    wiring::backend_named(&config, name, None)?;
                }
            }
            config::redact_secrets(&mut config);
            let text = if cli.json {
                let mut value = serde_json::to_value(&config).map_err(|e| {
                    osstream_core::Error::new(osstream_core::ErrorKind::Unexpected, e.to_string())
                })?;
                value["config_file"] = config
                    .file
                    .path()
                    .map_or(serde_json::Value::Null, |p| p.display().to_string().into());
                serde_json::to_string_pretty(&value).map_err(|e| {
                    osstream_core::Error::new(osstream_core::ErrorKind::Unexpected, e.to_string())
                })?
            } else {
                format!(
                    "# read from {}\n{}",
                    config.file.describe(),
                    config::to_toml(&config)?
                )
            };
            println!("{text}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("osstream: {err}");
            ExitCode::from(2)
        }
    }
}
