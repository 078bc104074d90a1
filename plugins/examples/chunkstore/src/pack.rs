//! `osstream-chunkstore-pack RAW_IMAGE STORE_ROOT NAME [CHUNK_SIZE]`: stores a raw image
//! in a chunk store, deduplicating identical chunks and skipping chunks of zeroes.

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use osstream_example_chunkstore::Manifest;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 || args.len() > 5 {
        eprintln!("usage: osstream-chunkstore-pack RAW_IMAGE STORE_ROOT NAME [CHUNK_SIZE_BYTES]");
        return ExitCode::from(2);
    }
    match pack(
        &args[1],
        &args[2],
        &args[3],
        args.get(4).map(String::as_str),
    ) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("osstream-chunkstore-pack: {err}");
            ExitCode::FAILURE
        }
    }
}

fn pack(image: &str, root: &str, name: &str, chunk_size: Option<&str>) -> Result<String, String> {
    let chunk_size: u64 = chunk_size
        .unwrap_or("1048576")
        .parse()
        .map_err(|e| format!("bad chunk size: {e}"))?;
    if chunk_size == 0 {
        return Err("chunk size must be positive".into());
    }
    let root = PathBuf::from(root);
    let chunks_dir = root.join("chunks");
    fs::create_dir_all(&chunks_dir).map_err(|e| format!("{}: {e}", chunks_dir.display()))?;
    let mut input = fs::File::open(image).map_err(|e| format!("{image}: {e}"))?;
    let size = input.metadata().map_err(|e| e.to_string())?.len();
    let mut chunks = Vec::new();
    let (mut stored, mut shared, mut zero) = (0, 0, 0);
    let mut buf = vec![0u8; chunk_size as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk_size) as usize;
        input
            .read_exact(&mut buf[..n])
            .map_err(|e| format!("{image}: {e}"))?;
        left -= n as u64;
        let data = &buf[..n];
        if data.iter().all(|&b| b == 0) {
            chunks.push(None);
            zero += 1;
            continue;
        }
        let id = content_id(data);
        let path = chunks_dir.join(format!("{id}.zz"));
        if path.exists() {
            shared += 1;
        } else {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(data).map_err(|e| e.to_string())?;
            let compressed = encoder.finish().map_err(|e| e.to_string())?;
            let partial = chunks_dir.join(format!(".{id}.partial"));
            fs::write(&partial, compressed).map_err(|e| format!("{}: {e}", partial.display()))?;
            fs::rename(&partial, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            stored += 1;
        }
        chunks.push(Some(id));
    }
    let manifest = Manifest {
        format: 1,
        size,
        chunk_size,
        chunks,
    };
    let dir = root.join(format!("{name}.chunks"));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    fs::write(dir.join("manifest.json"), json).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(format!(
        "{name}: {size} bytes, {stored} chunks stored, {shared} shared, {zero} zero"
    ))
}

/// Two FNV-1a passes with different seeds: a 128-bit name for the chunk's content. An
/// example, not a cryptographic store: a real product would use SHA-256 here.
fn content_id(data: &[u8]) -> String {
    let hash = |seed: u64| {
        data.iter().fold(seed, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        hash(0xcbf2_9ce4_8422_2325),
        hash(0x8422_2325_cbf2_9ce4)
    )
}
