//! The 64-byte index record of one slot.

use osstream_core::BlockKey;

/// Bytes per record.
pub(crate) const RECORD: usize = 64;

const MAGIC: u32 = 0x4F53_4443; // "OSDC"

/// What a slot holds, as written in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) key: BlockKey,
    pub(crate) len: u32,
    pub(crate) crc: u32,
}

impl Record {
    /// The sealed record: magic, key, length, data CRC, and a CRC of the 60 bytes before it.
    pub(crate) fn encode(&self) -> [u8; RECORD] {
        let mut out = [0u8; RECORD];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..20].copy_from_slice(&self.key.image.to_le_bytes());
        out[20..36].copy_from_slice(&self.key.generation.to_le_bytes());
        out[36..44].copy_from_slice(&self.key.block.to_le_bytes());
        out[44..48].copy_from_slice(&self.len.to_le_bytes());
        out[48..52].copy_from_slice(&self.crc.to_le_bytes());
        let seal = crc32fast::hash(&out[..60]);
        out[60..64].copy_from_slice(&seal.to_le_bytes());
        out
    }

    /// The record in `bytes`, if it is one (an empty slot, a torn or foreign record is
    /// `None`).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes: &[u8; RECORD] = bytes.try_into().ok()?;
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        if u32_at(0) != MAGIC || u32_at(60) != crc32fast::hash(&bytes[..60]) {
            return None;
        }
        let u128_at = |at: usize| u128::from_le_bytes(bytes[at..at + 16].try_into().unwrap());
        Some(Record {
            key: BlockKey {
                image: u128_at(4),
                generation: u128_at(20),
                block: u64::from_le_bytes(bytes[36..44].try_into().unwrap()),
            },
            len: u32_at(44),
            crc: u32_at(48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_seen() {
        let record = Record {
            key: BlockKey {
                image: u128::MAX - 3,
                generation: 42,
                block: 7,
            },
            len: 65536,
            crc: 0xdead_beef,
        };
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Some(record));
        assert_eq!(Record::decode(&[0u8; RECORD]), None);
        for at in [0, 5, 40, 47, 61] {
            let mut torn = bytes;
            torn[at] ^= 1;
            assert_eq!(Record::decode(&torn), None, "byte {at}");
        }
    }
}
