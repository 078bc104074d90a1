//! Helpers shared by the catalog's test files: a throwaway PostgreSQL cluster, and a
//! standard vdisk record.

use std::path::PathBuf;
use std::process::Command;

/// A standard vdisk `name` on backend `images`, key `name`, 1 MiB, RAM overlays.
#[allow(dead_code)] // not every test file that shares this module uses it
pub fn standard_vdisk(name: &str) -> osstream_catalog::Vdisk {
    osstream_catalog::Vdisk {
        name: name.into(),
        backend: "images".into(),
        key: name.into(),
        size: 1 << 20,
        mode: osstream_catalog::VdiskMode::Standard,
        write_cache: osstream_catalog::WriteCache::Ram,
        boot: osstream_catalog::BootMethod::LinuxNbd,
        kernel: None,
        initrd: None,
        cmdline: None,
        description: String::new(),
        enabled: true,
        locked_by: None,
        created_at: 0,
        image_id: None,
    }
}

/// A PostgreSQL cluster in a temp dir on its own port, stopped when dropped.
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    /// Where to connect: `postgres://osstream@127.0.0.1:PORT/postgres`.
    pub url: String,
}

impl PgCluster {
    /// Creates and starts a cluster (as the `postgres` user when run as root).
    pub fn start() -> PgCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (apt-get install postgresql); scripts/test.sh installs it")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("no initdb under /usr/lib/postgresql");
        let dir = tempfile::Builder::new()
            .prefix("osstream-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        // initdb refuses to run as root: run the cluster as the postgres user.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let run = |args: &[&str]| {
            let mut cmd = if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]);
                c
            } else {
                Command::new(args[0])
            };
            if as_root {
                cmd.args(args);
            } else {
                cmd.args(&args[1..]);
            }
            let out = cmd.output().expect("run a PostgreSQL tool");
            assert!(
                out.status.success(),
                "{args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if as_root {
            assert!(
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let data = dir.join("data");
        let initdb = bin.join("initdb");
        let pg_ctl = bin.join("pg_ctl");
        run(&[
            initdb.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "osstream",
            "--no-sync",
        ]);
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        let log = dir.join("log");
        run(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]);
        PgCluster {
            dir,
            bin,
            url: format!("postgres://osstream@127.0.0.1:{port}/postgres"),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&pg_ctl)
            .args(["-D"])
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output()
            .or_else(|_| {
                Command::new(&pg_ctl)
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "immediate", "stop"])
                    .output()
            });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
