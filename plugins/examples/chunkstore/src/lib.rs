//! An example vendor backend: vdisks kept as compressed, deduplicated chunks.
//!
//! Layout under the configured `root`:
//!
//! ```text
//! root/
//!   chunks/<id>.zz          zlib-compressed chunk content, shared by every image
//!   NAME.chunks/manifest.json
//!       { "format": 1, "size": <bytes>, "chunk_size": <bytes>,
//!         "chunks": ["<id>", null, ...] }       null = a chunk of zeroes (not stored)
//! ```
//!
//! Identical chunks are stored once (the packer names them by content hash) and chunks of
//! zeroes are not stored at all, which is how OS images of 40 GiB take a few GiB. Reads
//! decompress whole chunks and keep the last few in memory; osstream's RAM cache sits in
//! front anyway. Images are read-only. `osstream-chunkstore-pack` (in this crate) builds a
//! store from a raw image.
//!
//! Configuration (`config` of the backend table): `{ "root": "/srv/chunkstore",
//! "cached_chunks": 16 }`.

use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use osstream_plugin_sdk::{
    Image, ImageInfo, Plugin, PluginError, ThreadModel, abi, export_plugin, log,
};
use serde::{Deserialize, Serialize};

/// The manifest of one image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version; this plugin reads 1.
    pub format: u32,
    /// Image size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u64,
    /// Chunk ids in order; `None` is a chunk of zeroes.
    pub chunks: Vec<Option<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    root: PathBuf,
    #[serde(default = "default_cached_chunks")]
    cached_chunks: usize,
}

fn default_cached_chunks() -> usize {
    16
}

/// The plugin instance: one store.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    cached_chunks: usize,
}

/// One open image.
#[derive(Debug)]
pub struct ChunkImage {
    chunks_dir: PathBuf,
    manifest: Manifest,
    generation: String,
    /// Recently decompressed chunks, most recent last.
    recent: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    cached_chunks: usize,
}

fn manifest_path(root: &Path, name: &str) -> PathBuf {
    root.join(format!("{name}.chunks")).join("manifest.json")
}

fn valid_chunk_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn read_manifest(path: &Path) -> Result<(Manifest, String), PluginError> {
    let bytes = fs::read(path)?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| PluginError::invalid(format!("{}: bad manifest: {e}", path.display())))?;
    if manifest.format != 1 || manifest.chunk_size == 0 {
        return Err(PluginError::invalid(format!(
            "{}: unsupported format or chunk size",
            path.display()
        )));
    }
    let needed = manifest.size.div_ceil(manifest.chunk_size);
    if manifest.chunks.len() as u64 != needed {
        return Err(PluginError::invalid(format!(
            "{}: {} chunks listed, {needed} needed for {} bytes",
            path.display(),
            manifest.chunks.len(),
            manifest.size
        )));
    }
    if let Some(bad) = manifest
        .chunks
        .iter()
        .flatten()
        .find(|id| !valid_chunk_id(id))
    {
        return Err(PluginError::invalid(format!(
            "{}: invalid chunk id {bad:?}",
            path.display()
        )));
    }
    // The manifest's own content identifies the version: a re-packed image differs.
    let generation = format!("{:016x}", fnv1a(&bytes));
    Ok((manifest, generation))
}

/// FNV-1a over the manifest: stable across runs, enough to tell versions apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Plugin for ChunkStore {
    const NAME: &'static str = "chunkstore";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;
    type Image = ChunkImage;

    fn load(config: serde_json::Value) -> Result<Self, PluginError> {
        let config: Config = serde_json::from_value(config).map_err(|e| {
            PluginError::invalid(format!(
                "chunkstore config: {e} (keys: root, cached_chunks)"
            ))
        })?;
        if !config.root.is_dir() {
            return Err(PluginError::not_found(format!(
                "chunkstore root {} is not a directory",
                config.root.display()
            )));
        }
        log(
            abi::LOG_INFO,
            &format!("chunkstore serving {}", config.root.display()),
        );
        Ok(ChunkStore {
            root: config.root,
            cached_chunks: config.cached_chunks.max(1),
        })
    }

    fn list(&self) -> Result<Vec<ImageInfo>, PluginError> {
        let mut images = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".chunks")) else {
                continue;
            };
            match read_manifest(&manifest_path(&self.root, name)) {
                Ok((manifest, generation)) => images.push(ImageInfo {
                    name: name.to_owned(),
                    size: manifest.size,
                    generation,
                }),
                Err(err) => log(abi::LOG_WARN, &format!("skipping {name}: {}", err.message)),
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    fn open(&self, name: &str, writable: bool) -> Result<ChunkImage, PluginError> {
        if writable {
            return Err(PluginError::new(
                abi::ERROR_READ_ONLY,
                "chunkstore images are read-only",
            ));
        }
        if name.contains('/') || name.starts_with('.') {
            return Err(PluginError::invalid(format!("invalid image name {name:?}")));
        }
        let (manifest, generation) =
            read_manifest(&manifest_path(&self.root, name)).map_err(|e| {
                if e.kind == abi::ERROR_NOT_FOUND {
                    PluginError::not_found(format!("no image {name} in the store"))
                } else {
                    e
                }
            })?;
        Ok(ChunkImage {
            chunks_dir: self.root.join("chunks"),
            manifest,
            generation,
            recent: Mutex::new(VecDeque::new()),
            cached_chunks: self.cached_chunks,
        })
    }
}

impl ChunkImage {
    fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.manifest.chunk_size;
        (self.manifest.chunk_size.min(self.manifest.size - start)) as usize
    }

    /// The decompressed content of chunk `index`, or `None` for a chunk of zeroes.
    fn chunk(&self, index: u64) -> Result<Option<Arc<Vec<u8>>>, PluginError> {
        let Some(id) = &self.manifest.chunks[index as usize] else {
            return Ok(None);
        };
        if let Some((_, data)) = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(i, _)| *i == index)
        {
            return Ok(Some(data.clone()));
        }
        let path = self.chunks_dir.join(format!("{id}.zz"));
        let compressed = fs::read(&path)
            .map_err(|e| PluginError::io(format!("{}: {e}", path.display()), false))?;
        let expected = self.chunk_len(index);
        let mut data = Vec::with_capacity(expected);
        flate2::read::ZlibDecoder::new(&compressed[..])
            .take(expected as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| {
                PluginError::io(format!("{}: corrupt chunk: {e}", path.display()), false)
            })?;
        if data.len() != expected {
            return Err(PluginError::io(
                format!(
                    "{}: chunk holds {} bytes, expected {expected}",
                    path.display(),
                    data.len()
                ),
                false,
            ));
        }
        let data = Arc::new(data);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back((index, data.clone()));
        while recent.len() > self.cached_chunks {
            recent.pop_front();
        }
        Ok(Some(data))
    }
}

impl Image for ChunkImage {
    fn size(&self) -> Result<u64, PluginError> {
        Ok(self.manifest.size)
    }

    fn generation(&self) -> Result<String, PluginError> {
        Ok(self.generation.clone())
    }

    fn block_size(&self) -> Option<(u32, u32, u32)> {
        let preferred = u32::try_from(self.manifest.chunk_size.min(1 << 20)).ok()?;
        Some((1, preferred.next_power_of_two(), 32 << 20))
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), PluginError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.manifest.size)
            .ok_or_else(|| {
                PluginError::new(abi::ERROR_OUT_OF_RANGE, "read past the end of the image")
            })?;
        let chunk_size = self.manifest.chunk_size;
        let mut position = offset;
        while position < end {
            let index = position / chunk_size;
            let within = (position - index * chunk_size) as usize;
            let take = (self.chunk_len(index) - within).min((end - position) as usize);
            let out = &mut buf[(position - offset) as usize..][..take];
            match self.chunk(index)? {
                Some(data) => out.copy_from_slice(&data[within..within + take]),
                None => out.fill(0),
            }
            position += take as u64;
        }
        Ok(())
    }
}

export_plugin!(ChunkStore);
