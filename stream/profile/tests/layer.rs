//! The profile layer over a real cache layer and an instrumented backend: a boot is
//! recorded, the next boot's blocks are prefetched, stale profiles are not used.

use std::sync::Arc;
use std::time::Duration;

use osstream_core::{
    AttachContext, ByteSize, CacheLayer, DynSource, Layer, ProfileStore, RamTier, ReadOpts, Seconds,
};
use osstream_profile::{ProfileConfig, ProfileLayer};
use osstream_testkit::{InstrumentedSource, MemProfiles, MemSource, pattern};

const BLOCK: u64 = 64 * 1024;

fn config() -> ProfileConfig {
    ProfileConfig {
        quiet: Seconds(Duration::from_millis(200)),
        min_bytes: ByteSize(BLOCK),
        ..ProfileConfig::default()
    }
}

fn context(session: &str, generation: &str) -> AttachContext {
    AttachContext {
        protocol: "nbd",
        peer: "127.0.0.1:5000".into(),
        export: format!("s/{session}"),
        client: Some("52:54:00:00:00:01".into()),
        session: Some(session.into()),
        vdisk: Some("deb".into()),
        image: "mem:deb".into(),
        generation: generation.into(),
    }
}

struct Server {
    backend: Arc<InstrumentedSource>,
    cache: Arc<CacheLayer>,
    profile: Arc<ProfileLayer>,
}

impl Server {
    /// A freshly started server: empty cache, counting backend, profiles in `store`.
    fn start(store: Arc<MemProfiles>, generation: &str, config: ProfileConfig) -> Self {
        let image = MemSource::new("deb", pattern(7, 8 << 20)).renamed_generation(generation);
        let backend = InstrumentedSource::counting(Arc::new(image), Duration::from_millis(1));
        Server {
            backend,
            cache: Arc::new(CacheLayer::new(Arc::new(RamTier::new(64 << 20)), BLOCK)),
            profile: Arc::new(ProfileLayer::new(config, store, true)),
        }
    }

    fn attach(&self, context: &AttachContext) -> DynSource {
        let cached = self.cache.layer(self.backend.clone());
        let source = self.profile.layer(cached);
        self.profile.attached(context, &source);
        source
    }
}

async fn read_blocks(source: &DynSource, blocks: &[u64]) {
    for &block in blocks {
        let bytes = source
            .read_at(block * BLOCK + 512, 4096, ReadOpts::default())
            .await
            .unwrap();
        let want = pattern(7, 8 << 20);
        let at = (block * BLOCK + 512) as usize;
        assert_eq!(bytes.to_vec(), want[at..at + 4096].to_vec());
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn stored(store: &MemProfiles) -> osstream_core::BootProfile {
    for _ in 0..200 {
        if let Some(profile) = store.profile("deb").await.unwrap() {
            return profile;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no profile was stored");
}

const BOOT: [u64; 6] = [40, 3, 4, 5, 100, 6];

#[tokio::test]
async fn a_recorded_boot_is_prefetched_for_the_next_one_and_its_reads_hit() {
    let store = Arc::new(MemProfiles::default());
    let first = Server::start(store.clone(), "g1", config());
    let ctx = context("s1", "g1");
    let source = first.attach(&ctx);
    read_blocks(&source, &BOOT).await;
    first.profile.detached(&ctx);
    let profile = stored(&store).await;
    assert_eq!(profile.boot_set().collect::<Vec<_>>(), BOOT.to_vec());
    assert_eq!(first.profile.stats().boots_recorded, 1);
    assert_eq!(
        first.backend.prefetch_reads(),
        0,
        "nothing to prefetch on the first boot"
    );

    // A restarted server: cold cache, same store.
    let second = Server::start(store.clone(), "g1", config());
    let ctx = context("s2", "g1");
    let source = second.attach(&ctx);
    eventually("the prefetch", || {
        second.profile.stats().prefetch_reads == 3
    })
    .await;
    // 3,4,5,6 joined into one read; 40 and 100 alone.
    assert_eq!(second.backend.prefetch_reads(), 3);
    assert_eq!(second.profile.stats().prefetch_bytes, 6 * BLOCK);
    let before = second.backend.reads();
    read_blocks(&source, &BOOT).await;
    assert_eq!(
        second.backend.reads(),
        before,
        "every boot read was a cache hit"
    );
    assert_eq!(second.cache.stats().hits, BOOT.len() as u64);
    second.profile.detached(&ctx);
    // The second boot was merged in.
    eventually("the second recording", || {
        second.profile.stats().boots_recorded == 1
    })
    .await;
    assert_eq!(store.profile("deb").await.unwrap().unwrap().boots, 2);
}

#[tokio::test]
async fn a_profile_of_another_generation_is_never_used_and_is_replaced() {
    let store = Arc::new(MemProfiles::default());
    let old = Server::start(store.clone(), "g1", config());
    let ctx = context("s1", "g1");
    let source = old.attach(&ctx);
    read_blocks(&source, &BOOT).await;
    old.profile.detached(&ctx);
    stored(&store).await;

    let changed = Server::start(store.clone(), "g2", config());
    let ctx = context("s2", "g2");
    let source = changed.attach(&ctx);
    eventually("the stale profile to be seen", || {
        changed.profile.stats().stale_profiles == 1
    })
    .await;
    read_blocks(&source, &[9, 10]).await;
    changed.profile.detached(&ctx);
    eventually("the new recording", || {
        changed.profile.stats().boots_recorded == 1
    })
    .await;
    assert_eq!(changed.backend.prefetch_reads(), 0);
    let profile = store.profile("deb").await.unwrap().unwrap();
    assert_eq!((profile.generation.as_str(), profile.boots), ("g2", 1));
    assert_eq!(profile.boot_set().collect::<Vec<_>>(), vec![9, 10]);
}

#[tokio::test]
async fn connections_of_one_session_share_a_recording_and_a_session_is_recorded_once() {
    let store = Arc::new(MemProfiles::default());
    let server = Server::start(store.clone(), "g1", config());
    let ctx = context("s1", "g1");
    let mut second_ctx = ctx.clone();
    second_ctx.peer = "127.0.0.1:5001".into();
    let one = server.attach(&ctx);
    let two = server.attach(&second_ctx);
    read_blocks(&one, &[1, 2]).await;
    read_blocks(&two, &[3, 1]).await;
    server.profile.detached(&ctx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    read_blocks(&two, &[4]).await;
    // The quiet period ended the recording while `two` was still attached.
    let profile = stored(&store).await;
    assert_eq!(profile.boot_set().collect::<Vec<_>>(), vec![1, 2, 3]);
    server.profile.detached(&second_ctx);
    // The session comes back: no second recording, no prefetch.
    let again = server.attach(&ctx);
    read_blocks(&again, &[7, 8]).await;
    server.profile.detached(&ctx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = server.profile.stats();
    assert_eq!(
        (stats.boots_recorded, stats.prefetches),
        (1, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn short_connections_and_writable_images_are_not_recorded() {
    let store = Arc::new(MemProfiles::default());
    let config = ProfileConfig {
        min_bytes: ByteSize(3 * BLOCK),
        ..config()
    };
    let server = Server::start(store.clone(), "g1", config.clone());
    let ctx = context("probe", "g1");
    let source = server.attach(&ctx);
    read_blocks(&source, &[0, 1]).await;
    server.profile.detached(&ctx);
    eventually("the short recording to be dropped", || {
        server.profile.stats().not_boots == 1
    })
    .await;
    assert!(store.profile("deb").await.unwrap().is_none());

    let private = Arc::new(MemSource::writable("deb", pattern(7, 8 << 20))) as DynSource;
    let profile = ProfileLayer::new(config, store.clone(), true);
    let source = profile.layer(private.clone());
    assert!(
        Arc::ptr_eq(&source, &private),
        "a writable image is not wrapped"
    );
    let ctx = context("private", "g1");
    profile.attached(&ctx, &source);
    read_blocks(&source, &[0, 1, 2, 3]).await;
    profile.detached(&ctx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(profile.stats(), Default::default());
}
