//! One read transfer as a state machine, sans IO: which blocks to send, what an ACK means,
//! when the transfer is done. Block numbers are 64-bit here and roll over on the wire
//! (block 65536 is sent as 0), so files of any size transfer.

use std::ops::RangeInclusive;

/// The state of one read transfer.
#[derive(Debug, Clone)]
pub struct Transfer {
    size: u64,
    blksize: u64,
    windowsize: u64,
    /// Blocks in the file: the last one is shorter than `blksize` (possibly empty).
    blocks: u64,
    /// Every block up to this one is acknowledged (0: none yet).
    acked: u64,
    /// The highest block sent so far.
    sent: u64,
}

/// What an ACK did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// It acknowledges the last block: the transfer is complete.
    Done,
    /// It acknowledges the whole window sent: send the next one.
    WindowDone,
    /// It acknowledges part of the window (the client missed a block): resend from the
    /// block after it (RFC 7440).
    Partial,
    /// A duplicate or stale ACK: nothing to do (answering it would start the Sorcerer's
    /// Apprentice syndrome).
    Ignored,
}

impl Transfer {
    /// A transfer of `size` bytes in blocks of `blksize`, `windowsize` blocks per window.
    pub fn new(size: u64, blksize: u16, windowsize: u16) -> Self {
        let blksize = u64::from(blksize.max(1));
        Transfer {
            size,
            blksize,
            windowsize: u64::from(windowsize.max(1)),
            blocks: size / blksize + 1,
            acked: 0,
            sent: 0,
        }
    }

    /// The next window to send, from the block after the last acknowledged one; also what
    /// a retransmission sends.
    pub fn window(&mut self) -> RangeInclusive<u64> {
        let first = self.acked + 1;
        let last = (self.acked + self.windowsize).min(self.blocks);
        self.sent = self.sent.max(last);
        first..=last
    }

    /// Byte offset and length of `block` (1-based).
    pub fn extent(&self, block: u64) -> (u64, u64) {
        let offset = (block - 1) * self.blksize;
        (offset, self.blksize.min(self.size.saturating_sub(offset)))
    }

    /// The byte range of the blocks `window` covers, for one read.
    pub fn window_extent(&self, window: &RangeInclusive<u64>) -> (u64, u64) {
        let (start, _) = self.extent(*window.start());
        let (last, len) = self.extent(*window.end());
        (start, last + len - start)
    }

    /// A block's number on the wire.
    pub fn wire(block: u64) -> u16 {
        (block % 65536) as u16
    }

    /// Applies an ACK of wire block number `n`.
    pub fn ack(&mut self, n: u16) -> AckOutcome {
        // The only blocks an ACK can name are those sent and not yet acknowledged; a
        // window is at most 65535 blocks, so at most one of them has this wire number.
        let Some(block) = (self.acked + 1..=self.sent).find(|&b| Self::wire(b) == n) else {
            return AckOutcome::Ignored;
        };
        self.acked = block;
        if block == self.blocks {
            AckOutcome::Done
        } else if block == self.sent {
            AckOutcome::WindowDone
        } else {
            AckOutcome::Partial
        }
    }

    /// Blocks in the file.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether every block is acknowledged.
    pub fn done(&self) -> bool {
        self.acked == self.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_whole_blocks_ends_with_an_empty_block() {
        let t = Transfer::new(1024, 512, 1);
        assert_eq!(t.blocks(), 3);
        assert_eq!(t.extent(3), (1024, 0));
        let t = Transfer::new(0, 512, 1);
        assert_eq!(t.blocks(), 1);
        assert_eq!(t.extent(1), (0, 0));
    }

    #[test]
    fn lock_step_transfer_ignores_duplicates() {
        let mut t = Transfer::new(1000, 512, 1);
        assert_eq!(t.window(), 1..=1);
        assert_eq!(t.ack(0), AckOutcome::Ignored);
        assert_eq!(t.ack(1), AckOutcome::WindowDone);
        assert_eq!(t.ack(1), AckOutcome::Ignored);
        assert_eq!(t.window(), 2..=2);
        assert_eq!(t.extent(2), (512, 488));
        assert_eq!(t.ack(2), AckOutcome::Done);
        assert!(t.done());
    }

    #[test]
    fn windows_resume_after_a_partial_ack() {
        let mut t = Transfer::new(10 * 512 + 1, 512, 4);
        assert_eq!(t.window(), 1..=4);
        assert_eq!(t.window_extent(&(1..=4)), (0, 2048));
        assert_eq!(t.ack(2), AckOutcome::Partial);
        assert_eq!(t.window(), 3..=6);
        assert_eq!(t.ack(6), AckOutcome::WindowDone);
        assert_eq!(t.window(), 7..=10);
        assert_eq!(t.ack(10), AckOutcome::WindowDone);
        assert_eq!(t.window(), 11..=11);
        assert_eq!(t.window_extent(&(11..=11)), (5120, 1));
        assert_eq!(t.ack(11), AckOutcome::Done);
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        let blocks = 70_000u64;
        let mut t = Transfer::new(blocks * 8 - 3, 8, 16);
        let mut sent = 0;
        while !t.done() {
            let window = t.window();
            sent += window.clone().count();
            let last = *window.end();
            let outcome = t.ack(Transfer::wire(last));
            assert_ne!(outcome, AckOutcome::Ignored, "block {last}");
        }
        assert_eq!(sent as u64, blocks);
        assert_eq!(Transfer::wire(65536), 0);
        assert_eq!(Transfer::wire(65537), 1);
    }
}
