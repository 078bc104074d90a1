//! The NFS backend against a real user-space NFS server (nfs-ganesha, VFS backend) that
//! the test starts on loopback with its own ports.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use osstream_backend_nfs::{NfsBackend, NfsConfig};
use osstream_core::{BlockSourceExt, ErrorKind, ImageBackend, OpenMode};
use osstream_testkit::{conformance, pattern};

struct Ganesha {
    child: Child,
    dir: PathBuf,
    nfs_port: u16,
    mount_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Ganesha {
    fn start(dir: &Path) -> Ganesha {
        Self::start_on(dir, (free_port(), free_port()))
    }

    fn start_on(dir: &Path, (nfs_port, mount_port): (u16, u16)) -> Ganesha {
        assert!(
            Path::new("/usr/bin/ganesha.nfsd").exists(),
            "nfs-ganesha is not installed (apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind); scripts/test.sh installs it"
        );
        // NFSv3 registers with rpcbind; start one if none runs (it is left running).
        if !Command::new("pgrep")
            .arg("-x")
            .arg("rpcbind")
            .status()
            .is_ok_and(|s| s.success())
        {
            std::fs::create_dir_all("/run/rpcbind").unwrap();
            // Without -f rpcbind puts itself in the background once it is ready.
            let status = Command::new("rpcbind")
                .arg("-w")
                .status()
                .expect("rpcbind runs");
            assert!(status.success(), "rpcbind failed to start");
            std::thread::sleep(Duration::from_millis(300));
        }
        std::fs::create_dir_all(dir.join("export/vdisks")).unwrap();
        std::fs::create_dir_all(dir.join("recov")).unwrap();
        let config = format!(
            "NFS_CORE_PARAM {{ Bind_addr=127.0.0.1; NFS_Port={nfs_port}; MNT_Port={mount_port}; Protocols=3;
               Enable_NLM=false; Enable_RQUOTA=false; Enable_UDP=false; Mount_Path_Pseudo=true; }}
             NFS_KRB5 {{ Active_krb5=false; }}
             NFSV4 {{ Graceless=true; RecoveryBackend=fs; RecoveryRoot={d}/recov; }}
             EXPORT {{ Export_Id=1; Path={d}/export; Pseudo=/export; Access_Type=RO;
               Squash=No_Root_Squash; SecType=sys; Protocols=3; Transports=TCP; FSAL {{ Name=VFS; }} }}",
            d = dir.display()
        );
        std::fs::write(dir.join("ganesha.conf"), config).unwrap();
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-L")
            .arg(dir.join("ganesha.log"))
            .arg("-f")
            .arg(dir.join("ganesha.conf"))
            .arg("-p")
            .arg(dir.join("ganesha.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ganesha.nfsd starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", nfs_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "ganesha did not listen: {}",
                std::fs::read_to_string(dir.join("ganesha.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ganesha {
            child,
            dir: dir.to_path_buf(),
            nfs_port,
            mount_port,
        }
    }

    fn config(&self, connections: usize) -> NfsConfig {
        NfsConfig {
            server: "127.0.0.1".into(),
            export: "/export".into(),
            folder: "vdisks".into(),
            nfs_port: Some(self.nfs_port),
            mount_port: Some(self.mount_port),
            connections,
            extension: "img".into(),
            timeout: osstream_core::Seconds(Duration::from_secs(2)),
        }
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_backend_passes_the_suite_against_ganesha() {
    let dir = tempfile::tempdir().unwrap();
    let server = Ganesha::start(dir.path());
    let data = pattern(51, (5 << 20) + 4321);
    std::fs::write(dir.path().join("export/vdisks/os.img"), &data).unwrap();
    std::fs::write(dir.path().join("export/vdisks/notes.txt"), b"not an image").unwrap();
    let backend = NfsBackend::new("nas", server.config(3));
    let list = backend.list().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["os"]
    );
    assert_eq!(list[0].size, data.len() as u64);
    let source = backend.open("os", OpenMode::ReadOnly).await.unwrap();
    conformance::read_suite(source.clone(), &data).await;
    assert_eq!(
        backend
            .open("missing", OpenMode::ReadOnly)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        backend
            .open("os", OpenMode::ReadWrite)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::ReadOnly
    );

    // A server restart breaks every pooled connection: the same open source reconnects
    // and retries, and the client never sees the outage.
    let ports = (server.nfs_port, server.mount_port);
    drop(server);
    let _server = Ganesha::start_on(dir.path(), ports);
    for piece in 0..3u64 {
        let at = piece << 20;
        assert!(
            source.read_bytes(at, 1 << 20).await.unwrap()[..]
                == data[at as usize..(at + (1 << 20)) as usize]
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_is_a_temporary_error() {
    let config = NfsConfig {
        server: "127.0.0.1".into(),
        export: "/export".into(),
        folder: String::new(),
        nfs_port: Some(free_port()),
        mount_port: Some(free_port()),
        connections: 1,
        extension: "img".into(),
        timeout: osstream_core::Seconds(Duration::from_secs(2)),
    };
    let err = NfsBackend::new("nas", config).list().await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
    assert!(err.to_string().contains("mount"), "{err}");
}
