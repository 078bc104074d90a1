//! The `demo` vdisk created on first run, so the quickstart works on a fresh machine.

use std::io::Write;
use std::path::Path;

use osstream_core::{Error, Result};

/// Marks that the demo was created once, so deleting `demo.img` is respected.
const MARKER: &str = ".demo-created";

/// Creates `<images>/demo.img` of `size` bytes of deterministic non-zero content unless
/// it was created before. Returns whether it created it.
pub fn ensure(data_dir: &Path, images: &Path, size: u64) -> Result<bool> {
    let marker = data_dir.join(MARKER);
    let image = images.join("demo.img");
    if marker.exists() || image.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(images)
        .map_err(|e| Error::from_io(e, format!("cannot create {}", images.display())))?;
    let partial = images.join(".demo.img.partial");
    let io = |e| Error::from_io(e, format!("cannot write {}", partial.display()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
    let mut generator = Generator(0x6f73_7374_7265_616d); // "osstream"
    let mut chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < size {
        let n = (size - written).min(chunk.len() as u64) as usize;
        generator.fill(&mut chunk[..n]);
        file.write_all(&chunk[..n]).map_err(io)?;
        written += n as u64;
    }
    file.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    std::fs::rename(&partial, &image)
        .map_err(|e| Error::from_io(e, format!("cannot create {}", image.display())))?;
    std::fs::write(
        &marker,
        b"the demo vdisk was created here once; delete this file to have it made again\n",
    )
    .map_err(|e| Error::from_io(e, format!("cannot write {}", marker.display())))?;
    Ok(true)
}

/// xorshift64: fast, deterministic, and never all zeroes.
struct Generator(u64);

impl Generator {
    fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            word.copy_from_slice(&self.0.to_le_bytes()[..word.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_is_deterministic_and_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        assert!(super::ensure(dir.path(), &images, 3 << 20).unwrap());
        let first = std::fs::read(images.join("demo.img")).unwrap();
        assert_eq!(first.len(), 3 << 20);
        assert!(first.iter().filter(|&&b| b == 0).count() < first.len() / 100);
        std::fs::remove_file(images.join("demo.img")).unwrap();
        assert!(
            !super::ensure(dir.path(), &images, 3 << 20).unwrap(),
            "not recreated after deletion"
        );
        let other = tempfile::tempdir().unwrap();
        super::ensure(other.path(), &other.path().join("images"), 3 << 20).unwrap();
        assert_eq!(
            std::fs::read(other.path().join("images/demo.img")).unwrap(),
            first
        );
    }
}
