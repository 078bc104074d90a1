//! `[tftp]`: the TFTP server's configuration.

use std::path::PathBuf;

use osstream_core::{
    BackendContext, BootProtocol, Error, ErrorKind, ProtocolKind, Result, Seconds,
};
use serde::{Deserialize, Serialize};

/// `[tftp]`: read-only TFTP for PXE ROMs' bootloaders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Serve TFTP at all. Default: false.
    pub enabled: bool,
    /// Where to listen, `HOST:PORT`. Default: `0.0.0.0:69`.
    pub listen: String,
    /// The folder served: names are relative to it and never lead out of it. Relative
    /// paths are resolved against `data_dir`. Default: `/usr/lib/ipxe` (Debian's `ipxe`
    /// package: `undionly.kpxe`, `ipxe.efi`, ...).
    pub root: PathBuf,
    /// Serve names from this backend's boot files (`[backends.NAME]`) instead of `root`.
    /// Default: unset.
    pub backend: Option<String>,
    /// Largest block size granted (RFC 2348). Default: 1468 (one Ethernet frame).
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440). Default: 16.
    pub max_windowsize: u16,
    /// Retransmission timeout when the client asks for none. Default: `1s`.
    pub timeout: Seconds,
    /// Retransmissions of one window before the transfer is given up. Default: 5.
    pub retries: u32,
    /// Transfers at once; more are refused with a "busy" error. Default: 512.
    pub max_transfers: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enabled: false,
            listen: "0.0.0.0:69".to_owned(),
            root: PathBuf::from("/usr/lib/ipxe"),
            backend: None,
            max_blksize: 1468,
            max_windowsize: 16,
            timeout: Seconds(std::time::Duration::from_secs(1)),
            retries: 5,
            max_transfers: 512,
        }
    }
}

impl ProtocolKind for TftpConfig {
    const KIND: &'static str = crate::KIND;

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn check(&self) -> Result<()> {
        let config = |why: String| Error::new(ErrorKind::Config, why);
        osstream_core::check_listen("tftp.listen", &self.listen)?;
        if !(512..=65464).contains(&self.max_blksize) {
            return Err(config(format!(
                "tftp.max_blksize = {} must be between 512 and 65464",
                self.max_blksize
            )));
        }
        if !(1..=64).contains(&self.max_windowsize) {
            return Err(config(format!(
                "tftp.max_windowsize = {} must be between 1 and 64",
                self.max_windowsize
            )));
        }
        if self.timeout.0.is_zero() || self.timeout.0.as_secs() > 255 {
            return Err(config(format!(
                "tftp.timeout = {} must be between 1ms and 255s",
                self.timeout
            )));
        }
        if self.max_transfers == 0 {
            return Err(config(
                "tftp.max_transfers = 0 would refuse every client; give at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn build(mut self, ctx: &BackendContext) -> Result<Box<dyn BootProtocol>> {
        self.root = ctx.resolve(&self.root);
        Ok(Box::new(crate::TftpServer::new(self)))
    }
}
