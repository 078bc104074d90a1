//! `Exports::attach`: one path for every protocol, and the layer hooks it calls.

use std::sync::{Arc, Mutex};

use osstream_core::{
    AttachContext, AttachRequest, BlockSourceExt, Bytes, CacheLayer, DynSource, Error, ErrorKind,
    Exports, Grant, ImageState, Intent, Layer, LockToken, OverlayKind, OverlaySettings, RamTier,
    ReadOpts, Result, SessionDirectory, SessionTarget, WriteOpts, async_trait,
};
use osstream_testkit::{MemBackend, pattern};

/// A layer that adds nothing to the data path and records the hooks it hears.
#[derive(Debug, Default)]
struct Recorder {
    events: Mutex<Vec<(&'static str, AttachContext)>>,
}

impl Recorder {
    fn events(&self) -> Vec<(&'static str, AttachContext)> {
        self.events.lock().unwrap().clone()
    }
}

impl Layer for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        inner
    }

    fn attached(&self, context: &AttachContext, source: &DynSource) {
        assert_eq!(source.info().identity, context.image);
        self.events
            .lock()
            .unwrap()
            .push(("attached", context.clone()));
    }

    fn detached(&self, context: &AttachContext) {
        self.events
            .lock()
            .unwrap()
            .push(("detached", context.clone()));
    }
}

/// A catalog of one standard session, `tok` of client `aa:bb:...` on vdisk `dev`.
#[derive(Debug, Default)]
struct OneSession {
    detached: Mutex<Vec<(u64, u64, bool)>>,
    /// Overlays on the server's disk instead of in RAM.
    on_disk: bool,
}

fn session_target() -> SessionTarget {
    SessionTarget {
        group: None,
        session: "sess-1".into(),
        client: "aa:bb:cc:dd:ee:ff".into(),
        vdisk: "dev".into(),
        backend: "mem".into(),
        image: "disk".into(),
        overlay: Some(OverlayKind::Ram),
        description: "dev for aa:bb:cc:dd:ee:ff".into(),
        started_at: 1,
    }
}

#[async_trait]
impl SessionDirectory for OneSession {
    async fn resolve(&self, token: &str, _: &str) -> Result<SessionTarget> {
        if token == "tok" {
            let mut target = session_target();
            if self.on_disk {
                target.overlay = Some(OverlayKind::ServerDisk);
            }
            Ok(target)
        } else {
            Err(Error::new(ErrorKind::NotFound, "no such session"))
        }
    }
    async fn attach(&self, _: &SessionTarget, _: &str, _: &str) -> Result<Grant> {
        Ok(Grant {
            lock: None,
            image_epoch: 3,
        })
    }
    async fn detached(&self, _: &SessionTarget, read: u64, written: u64, last: bool) {
        self.detached.lock().unwrap().push((read, written, last));
    }
    async fn check_lock(&self, _: &LockToken) -> Result<()> {
        Ok(())
    }
    fn holds_lease(&self) -> bool {
        true
    }
    async fn renew_lease(&self, _: &LockToken) -> Result<()> {
        Ok(())
    }
    async fn image_state(&self, _: &str, _: &str, _: &str) -> Result<ImageState> {
        Ok(ImageState::default())
    }
}

const SIZE: usize = 1 << 20;

fn exports(recorder: &Arc<Recorder>) -> (Exports, Arc<MemBackend>, Arc<OneSession>) {
    exports_with(
        recorder,
        OneSession::default(),
        std::env::temp_dir().join("osstream-attach-test-unused"),
    )
}

fn exports_with(
    recorder: &Arc<Recorder>,
    directory: OneSession,
    overlay_dir: std::path::PathBuf,
) -> (Exports, Arc<MemBackend>, Arc<OneSession>) {
    let backend = Arc::new(MemBackend::new("mem").with_image("disk", pattern(1, SIZE)));
    let cache = Arc::new(CacheLayer::new(Arc::new(RamTier::new(8 << 20)), 64 << 10));
    let directory = Arc::new(directory);
    let overlays = OverlaySettings {
        dir: overlay_dir,
        shared_dir: None,
        ram_capacity: 4 << 20,
        block_size: 4096,
    };
    let exports = Exports::new(vec![backend.clone()], vec![cache, recorder.clone()])
        .with_sessions(directory.clone(), overlays);
    (exports, backend, directory)
}

fn request(name: &str, intent: Intent) -> AttachRequest<'_> {
    AttachRequest {
        name,
        peer: "10.0.0.7:4000",
        protocol: "test",
        intent,
    }
}

#[tokio::test]
async fn a_plain_name_attaches_read_only_and_layers_hear_attach_and_close() {
    let recorder = Arc::new(Recorder::default());
    let (exports, backend, _) = exports(&recorder);
    let attachment = exports.attach(request("disk", Intent::Use)).await.unwrap();
    assert!(!attachment.entry.writable);
    assert_eq!(attachment.session(), None);
    let data = attachment.source.read_all().await.unwrap();
    assert!(data[..] == pattern(1, SIZE)[..]);
    let err = attachment
        .source
        .write_at(0, Bytes::from_static(b"x"), WriteOpts::default())
        .await
        .expect_err("plain names are read-only");
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    // One stat to find the image, and the open takes it: no second look-up.
    assert_eq!((backend.stat_calls(), backend.open_calls()), (1, 1));

    let expected = AttachContext {
        protocol: "test",
        peer: "10.0.0.7:4000".into(),
        export: "disk".into(),
        client: None,
        session: None,
        vdisk: None,
        image: "mem:mem/disk".into(),
        generation: "mem-1".into(),
    };
    assert_eq!(attachment.context(), &expected);
    assert_eq!(recorder.events(), vec![("attached", expected.clone())]);
    attachment.close().await;
    assert_eq!(
        recorder.events(),
        vec![("attached", expected.clone()), ("detached", expected)]
    );
}

#[tokio::test]
async fn a_probe_takes_nothing_and_no_layer_hears_of_it() {
    let recorder = Arc::new(Recorder::default());
    let (exports, _, directory) = exports(&recorder);
    for name in ["disk", "s/tok"] {
        let probe = exports.attach(request(name, Intent::Probe)).await.unwrap();
        assert_eq!(probe.source.info().size, SIZE as u64, "{name}");
        assert!(!probe.ended().is_cancelled());
        probe.close().await;
    }
    assert!(recorder.events().is_empty(), "{:?}", recorder.events());
    assert!(directory.detached.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_session_attaches_with_its_overlay_and_close_accounts_for_its_bytes() {
    let recorder = Arc::new(Recorder::default());
    let (exports, _, directory) = exports(&recorder);
    let attachment = exports.attach(request("s/tok", Intent::Use)).await.unwrap();
    assert_eq!(attachment.entry.name, "s/sess-1");
    assert!(attachment.entry.writable);
    assert_eq!(attachment.session(), Some("sess-1"));
    let context = attachment.context().clone();
    assert_eq!(context.client.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
    assert_eq!(context.vdisk.as_deref(), Some("dev"));
    assert_eq!(context.export, "s/tok");
    // The catalog's image epoch is part of the generation the layers key by.
    assert_eq!(context.generation, "mem-1+w3");

    attachment
        .source
        .write_at(4096, Bytes::from(vec![9u8; 4096]), WriteOpts::default())
        .await
        .unwrap();
    let block = attachment
        .source
        .read_at(4096, 4096, ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(block.to_vec(), vec![9u8; 4096]);
    attachment.counters().written(4096);
    attachment.counters().read(4096);
    attachment.close().await;
    assert_eq!(
        *directory.detached.lock().unwrap(),
        vec![(4096, 4096, true)]
    );
    let events: Vec<&str> = recorder.events().iter().map(|(e, _)| *e).collect();
    assert_eq!(events, vec!["attached", "detached"]);
    assert_eq!(recorder.events()[1].1, context);

    // The overlay outlives the connection: the next connection of the session sees it.
    let again = exports.attach(request("s/tok", Intent::Use)).await.unwrap();
    let block = again
        .source
        .read_at(4096, 4096, ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(block.to_vec(), vec![9u8; 4096]);
    // Dropped without close: layers still hear of the end.
    drop(again);
    assert_eq!(recorder.events().len(), 4);
    assert_eq!(recorder.events()[3].0, "detached");
}

#[tokio::test]
async fn unknown_names_and_tokens_are_refused_with_their_kind() {
    let recorder = Arc::new(Recorder::default());
    let (exports, _, _) = exports(&recorder);
    let err = exports
        .attach(request("nope", Intent::Use))
        .await
        .expect_err("no such image");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = exports
        .attach(request("s/wrong", Intent::Use))
        .await
        .expect_err("no such session");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = exports
        .attach(request("../etc/passwd", Intent::Use))
        .await
        .expect_err("escapes");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(recorder.events().is_empty());
}

#[tokio::test]
async fn layers_hear_the_end_of_an_attach_that_fails_after_they_heard_of_it() {
    let recorder = Arc::new(Recorder::default());
    let session = OneSession {
        on_disk: true,
        ..OneSession::default()
    };
    // No overlay can be made there: the attach fails after the layers were told.
    let (exports, _, _) = exports_with(&recorder, session, "/proc/osstream-no-overlays".into());
    exports
        .attach(request("s/tok", Intent::Use))
        .await
        .expect_err("no overlay folder");
    let events: Vec<&str> = recorder.events().iter().map(|(e, _)| *e).collect();
    assert_eq!(events, vec!["attached", "detached"]);
}

#[tokio::test]
async fn boot_files_come_only_from_a_boot_file_home_never_from_images() {
    let backend = MemBackend::new("mem").with_image("disk", pattern(1, 4096));
    let exports = Exports::new(vec![Arc::new(backend)], Vec::new());
    // A backend without a home for boot files refuses: a key never reaches an image,
    // since boot files are served without a session.
    let err = exports
        .open_boot_file("v", "mem", "disk")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("boot/"), "{err}");
    let err = exports
        .open_boot_file("v", "nowhere", "k")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert_eq!(exports.backend_names(), ["mem"]);
}
